"""Integration/end-to-end tier: Ray Train on a local cluster with the tiny Llama.

One uninterrupted reference run; a run whose rank-0 worker is SIGKILLed mid-run; a run whose driver
is SIGKILLed and restarted. All three must end at the exact step count with the same loss curve.
Plus the guards (NaN loss, exploding gradient) and the gang-placement timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from runtime.errors import PlacementTimeout, TrainingDiverged
from runtime.specs import parse_spec
from tests.conftest import EXAMPLES, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STEPS = 60
# The kill tests pace their steps: the victim must be caught after a committed checkpoint and before the
# last step, and Ray Train's controller registers checkpoints on its own polling cadence.
PACED = "tests.train.train_hooks:paced_causal_lm"


def _spec_dict(root: Path, name: str, **train) -> dict:
    """examples/train.yaml (2 workers, checkpoints every 10 steps), in its own storage root, 60 steps."""
    d = yaml.safe_load((EXAMPLES / "train.yaml").read_text())
    d.update(name=name, storage={"root": str(root)}, registry={"enabled": False})
    d["data"]["path"] = str(EXAMPLES / "data" / "train.jsonl")
    assert d["resources"]["num_workers"] == 2 and d["train"]["checkpoint_every_n_steps"] == 10
    d["train"].update(steps=STEPS, checkpoints_to_keep=2, max_failures=2, **train)
    return d


def _run(d: dict):
    from runtime.training import run_training

    return run_training(parse_spec(d))


def _worker(root: Path, name: str, rank: int = 0) -> dict | None:
    p = root / "runs" / name / "workers" / f"rank-{rank}.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for_step(root: Path, name: str, step: int, timeout: float) -> dict:
    """Rank 0's pid once it is past ``step`` and Ray Train has committed at least one checkpoint."""
    snapshot = root / "runs" / name / "checkpoint_manager_snapshot.json"  # Ray Train's commit record
    t0 = time.time()
    while time.time() - t0 < timeout:
        w = _worker(root, name)
        committed = snapshot.is_file() and "step-0000" in snapshot.read_text(errors="ignore")
        if w and committed and step <= w["step"] < STEPS:
            return w
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached step {step} with a committed checkpoint: {_worker(root, name)}")


@pytest.fixture(scope="module", autouse=True)
def _fast_metrics_export():
    """Ray exports metrics every 10 s by default, about as long as the reference run takes; the
    dashboard test scrapes the run's live gauges while it trains."""
    saved = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    yield
    os.environ.pop("RAY_metrics_report_interval_ms") if saved is None else os.environ.update(
        RAY_metrics_report_interval_ms=saved)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ray_local):
    """The reference run, and every series name seen on the node's metrics port while it ran."""
    from tests.dashboard import Scraper, metrics_url

    root = tmp_path_factory.mktemp("train-ref")
    with Scraper(metrics_url()) as scraped:
        result = _run(_spec_dict(root, "ref", log_every_n_steps=5))
    return result, scraped.seen


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[0]


@pytest.mark.timeout(300)
def test_dashboard_training_panels_query_exported_metrics(reference_run):
    from tests.dashboard import assert_rows_exported, metrics_url, sample_values

    _, seen = reference_run
    assert_rows_exported("Training", seen=seen)
    steps = sum(sample_values(metrics_url(), "ray_raylane_train_steps_total", job="ref"))
    assert 0 < steps <= STEPS, steps


@pytest.mark.timeout(400)
def test_loss_decreases_and_steps_are_exact(reference):
    r = reference
    assert r.final_step == r.total_steps == STEPS
    assert r.resumed_from_step is None and r.restarts == 0
    assert len(r.loss_history) == STEPS
    first, last = np.mean(r.loss_history[:10]), np.mean(r.loss_history[-10:])
    assert last < first - 1.0, (first, last)  # from-scratch training on a repetitive corpus learns fast
    assert r.eval["eval_loss"] < first and r.eval["perplexity"] == pytest.approx(np.exp(r.eval["eval_loss"]))
    ckpts = sorted(p.name for p in Path(r.checkpoint).parent.glob("step-*"))
    assert ckpts == ["step-000050", "step-000060"]  # checkpoints_to_keep: 2
    assert (Path(r.checkpoint) / "spec.yaml").is_file() and (Path(r.model_dir) / "config.json").is_file()


def test_ray_data_token_shards_hold_the_packed_corpus(reference, tiny_model):
    """The reference run tokenized and packed with Ray Data: the shards hold what packing the whole
    corpus in memory gives, row for row, in one folder keyed by the data, tokenizer and length."""
    from transformers import AutoTokenizer

    from runtime.specs.training import DatasetSpec
    from runtime.training.data import load_documents, pack, split
    from runtime.training.shards import open_shards

    d = reference.data
    assert d["built"] and Path(d["directory"]).name == d["key"] and Path(d["directory"]).parent.name == "datasets"
    s = open_shards(d["directory"])
    spec = DatasetSpec(**_spec_dict(Path("/unused"), "ref")["data"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train, held = split(load_documents(spec, tok), spec.eval_fraction)
    np.testing.assert_array_equal(s.train[:], pack(tok, train, spec.max_seq_len))
    np.testing.assert_array_equal(s.eval[:], pack(tok, held, spec.max_seq_len))


@pytest.mark.timeout(500)
def test_killed_worker_resumes_with_exact_steps(tmp_path, reference):
    killed = {}

    def killer():
        w = _wait_for_step(tmp_path, "killed", 20, timeout=300)
        os.kill(w["pid"], signal.SIGKILL)
        killed.update(w)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    r = _run(_spec_dict(tmp_path, "killed", step_fn=PACED))
    t.join(timeout=5)
    assert killed, "the worker was never killed"
    assert r.restarts == 1
    assert r.resumed_from_step is not None and r.resumed_from_step >= 10 and r.resumed_from_step % 10 == 0
    assert r.final_step == STEPS and len(r.loss_history) == STEPS
    # same data position, RNG and optimiser state after the resume: the same loss curve
    np.testing.assert_allclose(r.loss_history, reference.loss_history, rtol=1e-3)


@pytest.mark.timeout(600)
def test_restarted_driver_resumes(tmp_path, reference):
    spec_path = tmp_path / "train.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_dict(tmp_path, "driver", step_fn=PACED)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.train", "--spec", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_step(tmp_path, "driver", 20, timeout=400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    t_rerun = time.time()
    r = _run(_spec_dict(tmp_path, "driver", step_fn=PACED))
    # The rerun tokenized nothing: it read the token shards the killed driver's run had written.
    index = Path(r.data["directory"]) / "index.json"
    assert r.data["built"] is False and index.stat().st_mtime < t_rerun, r.data
    assert all(f.stat().st_mtime < t_rerun for f in index.parent.iterdir())
    # uploads are async: the newest committed checkpoint may be behind what the worker reported
    assert r.resumed_from_step is not None and r.resumed_from_step >= 10
    assert r.final_step == STEPS and len(r.loss_history) == STEPS and r.restarts == 0
    np.testing.assert_allclose(r.loss_history, reference.loss_history, rtol=1e-3)


@pytest.mark.timeout(300)
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, ray_local):
    d = _spec_dict(tmp_path, "nan", checkpoint_every_n_steps=2, step_fn="tests.train.train_hooks:nan_from_step_6")
    with pytest.raises(TrainingDiverged) as e:
        _run(d)
    assert "loss is nan at step 6" in str(e.value)
    assert "step-000004" in str(e.value) and "learning_rate" in str(e.value)
    import torch

    state = torch.load(tmp_path / "runs" / "nan" / "step-000004" / "state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["losses"]) == 4 and all(np.isfinite(state["losses"]))
    assert not (tmp_path / "runs" / "nan" / "step-000006").exists()


@pytest.mark.timeout(300)
def test_exploding_gradient_guard(tmp_path, ray_local):
    d = _spec_dict(tmp_path, "boom", max_grad_norm=1e-3)
    with pytest.raises(TrainingDiverged, match=r"gradient norm .* exceeds train.max_grad_norm=0.001 at step 1"):
        _run(d)


@pytest.mark.timeout(120)
def test_gang_that_cannot_fit_fails_naming_resources(ray_local):
    from runtime.placement import check_gang
    from runtime.specs.common import Resources

    t0 = time.time()
    with pytest.raises(PlacementTimeout) as e:
        check_gang(Resources(num_workers=2, cpus_per_worker=1, gpus_per_worker=1), "PACK", timeout_s=2)
    assert time.time() - t0 < 30
    assert "missing 2 GPU" in str(e.value)
    with pytest.raises(PlacementTimeout, match="STRICT_SPREAD needs 2 nodes"):
        check_gang(Resources(num_workers=2, cpus_per_worker=1), "STRICT_SPREAD", timeout_s=2)
    check_gang(Resources(num_workers=2, cpus_per_worker=1), "STRICT_PACK", timeout_s=30)  # fits: no error
