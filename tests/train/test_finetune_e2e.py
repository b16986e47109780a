"""End-to-end tier for LoRA fine-tuning: the example spec through the real CLI, the eval gate on a
second run, the drift trigger, and the adapter changing vLLM's greedy output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _example(root: Path, **over) -> dict:
    d = yaml.safe_load((EXAMPLES / "finetune.yaml").read_text())
    d["data"]["path"] = str(EXAMPLES / "data" / "train.jsonl")
    d["storage"] = {"root": str(root)}
    for k, v in over.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return d


def _peek_registry(db: Path) -> tuple[int, int] | None:
    """(loss points, model versions) in the registry's SQLite file, read-only; None while it is not ready."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
            return (c.execute("SELECT COUNT(*) FROM metrics WHERE key = 'loss'").fetchone()[0],
                    c.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0])
    except sqlite3.Error:
        return None


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """examples/finetune.yaml, as a user runs it: `raylane run SPEC --json` in a fresh process. While
    it runs, the registry is read twice a second: what the MLflow UI would show during training."""
    import time

    root = tmp_path_factory.mktemp("ft")
    spec = root / "finetune.yaml"
    spec.write_text(yaml.safe_dump(_example(root)))
    db, seen = root / "registry" / "mlflow.db", []
    with open(root / "stdout", "w") as out, open(root / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "raylane", "run", str(spec), "--json"], stdout=out, stderr=err,
                                text=True, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            seen.append(_peek_registry(db) if db.is_file() else None)
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == 0, (root / "stderr").read_text()[-3000:]
    return root, json.loads((root / "stdout").read_text()), seen


@pytest.mark.timeout(900)
def test_finetune_example_trains_evaluates_and_registers(finetuned):
    _, out, _ = finetuned
    assert out["final_step"] == out["total_steps"] == 40
    assert out["resumed_from_step"] is None and out["restarts"] == 0
    hist = out["loss_history"]
    assert len(hist) == 40 and sum(hist[-5:]) / 5 < sum(hist[:5]) / 5
    assert out["eval"]["eval_loss"] > 0 and out["eval"]["perplexity"] > 1
    assert out["registry"]["name"] == "support-lora" and out["registry"]["version"] == 1
    assert out["registry"]["alias"] == "champion" and out["gate"]["reason"] == "no champion yet"
    adapter = Path(out["model_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert Path(out["checkpoint"]).name == "step-000040"


@pytest.mark.timeout(120)
def test_mlflow_run_has_the_live_training_curves_and_the_version_links_to_it(finetuned):
    """Rank 0 logged loss, lr, grad_norm and tokens/s every train.log_every_n_steps (default 10)
    steps into the MLflow run the driver opened before training; model version 1 links to it."""
    from mlflow.tracking import MlflowClient

    from runtime.registry import tracking_uri

    root, out, seen = finetuned
    uri = tracking_uri(str(root))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("support-lora", "1")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "support-lora"
    assert run.data.params["train.log_every_n_steps"] == "10"
    assert run.data.metrics["eval_loss"] == pytest.approx(out["eval"]["eval_loss"])
    curves = {k: client.get_metric_history(run.info.run_id, k) for k in ("loss", "lr", "grad_norm", "tokens_per_s")}
    for key, history in curves.items():
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [10, 20, 30, 40], key
        assert all(m.value >= 0 for m in history), key  # the cosine schedule ends at lr 0
    assert all(m.value > 0 for k in ("loss", "grad_norm", "tokens_per_s") for m in curves[k])
    loss = {m.step: m.value for m in curves["loss"]}
    hist = out["loss_history"]  # the window means of the per-step losses the run reported
    assert loss[10] == pytest.approx(sum(hist[:10]) / 10, rel=1e-4)
    assert loss[40] == pytest.approx(sum(hist[30:]) / 10, rel=1e-4) and loss[40] < loss[10]
    lr = {m.step: m.value for m in curves["lr"]}
    assert lr[40] < lr[10]  # the cosine schedule decays
    # Logged from the training loop: every point predates evaluation and registration...
    assert max(m.timestamp for h in curves.values() for m in h) < version.creation_timestamp
    # ...and was in the store while the job still ran: polls saw loss points before any version existed.
    assert any(points > 0 and versions == 0 for points, versions in filter(None, seen)), seen


@pytest.mark.timeout(600)
def test_gate_refuses_a_worse_model_and_keeps_the_champion(finetuned, ray_local):
    from runtime.registry import Registry
    from runtime.specs import parse_spec
    from runtime.training import run_finetune

    root, first, _ = finetuned
    # Two steps of training cannot beat forty on the same held-out data.
    r = run_finetune(parse_spec(_example(root, name="support-lora-short", train={"steps": 2},
                                         eval={"metric": "tests.train.train_hooks:mean_token_count"})))
    assert r.eval["eval_docs"] > 0  # the metric by import path ran on the held-out documents
    assert r.registry["version"] == 2 and r.registry["alias"] == "challenger"
    assert r.gate["promote"] is False and r.gate["champion_version"] == 1 and "stays challenger" in r.gate["reason"]
    assert r.gate["new"] > r.gate["champion"]
    reg = Registry(str(root))
    assert {v.version: v.aliases for v in reg.list("support-lora")} == {1: ["champion"], 2: ["challenger"]}
    lineage = reg.get("support-lora", 2).tags
    assert lineage["raylane.base_model"] == "tiny" and lineage["raylane.dataset_fingerprint"] == first["dataset_fingerprint"]


@pytest.mark.timeout(600)
def test_drift_check_reports_without_fine_tuning_when_healthy(finetuned, ray_local):
    from runtime.specs import parse_spec
    from runtime.training import check_drift

    root, first, _ = finetuned
    d = _example(root, drift={"data": {"path": str(EXAMPLES / "data" / "train.jsonl"), "max_seq_len": 64},
                              "max_degradation": 0.5})
    spec = root / "drift.yaml"
    spec.write_text(yaml.safe_dump(d))
    r = subprocess.run([sys.executable, "-m", "jobs.drift_check", "--spec", str(spec), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""}, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    healthy = json.loads(r.stdout)
    assert healthy["champion_version"] == 1 and not healthy["degraded"] and healthy["action"] == "none"
    assert healthy["recorded_eval_loss"] == pytest.approx(first["eval"]["eval_loss"])
    d["drift"] = {"data": {"path": str(EXAMPLES / "data" / "chat.jsonl"), "messages_column": "messages",
                           "max_seq_len": 64}, "max_degradation": 0.0}
    drifted = check_drift(parse_spec(d), submit=False)
    assert drifted.recent_eval_loss != healthy["recent_eval_loss"]
    assert drifted.degraded == (drifted.degradation > 0) and drifted.run_name.startswith("support-lora-drift-")


@pytest.mark.timeout(900)
def test_adapter_changes_vllm_output(finetuned, ray_local):
    import ray

    from runtime.vllm_env import engine_runtime_env
    from tests.train.train_hooks import generate_with_and_without_lora

    _, out, _ = finetuned
    base = json.loads((Path(out["model_dir"]) / "adapter_config.json").read_text())["base_model_name_or_path"]
    prompts = ["Ticket 7: my laptop", "Support: for the router,"]
    task = ray.remote(generate_with_and_without_lora).options(num_cpus=1, runtime_env=engine_runtime_env(False), max_retries=0)
    plain, tuned = ray.get(task.remote(base, out["model_dir"], prompts))
    assert all(plain) and all(tuned)
    assert plain != tuned, (plain, tuned)
