"""Batch inference end to end: real vLLM (CPU) through ray.data.llm on the tiny model.

One run of examples/batch.yaml is shared by the completeness, outlier, resume and verify tests;
the adapter, killed-worker and killed-driver tests each start their own engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from runtime.batch import run_batch, verify_output
from runtime.batch import shards as sh
from runtime.batch.corpus import sample_corpus, write_corpus
from runtime.specs import load_spec, parse_spec
from tests.conftest import EXAMPLES, ROOT, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("shard-*")):
        rows += sh.decode_rows(f.read_bytes(), "parquet" if f.suffix == ".parquet" else "jsonl")
    return rows


def _spec_dict(name: str, corpus: Path, out: Path, model: Path, root: Path, **over) -> dict:
    d = {
        "kind": "BatchInference", "name": name, "model": str(model),
        "input": {"path": str(corpus)}, "output": {"path": str(out), "format": "jsonl"},
        "sampling": {"max_tokens": 24, "ignore_eos": True},
        "rows_per_shard": 100, "max_model_len": 256, "storage": {"root": str(root)},
        # Few rows in flight, so shards commit one after another and a kill lands mid-run.
        "batch_size": 32, "max_concurrent_batches": 2,
    }
    d.update(over)
    return d


@pytest.fixture(scope="module")
def example_run(ray_local, tiny_model, tmp_path_factory):
    """examples/batch.yaml as shipped, with its output and storage redirected to a temp folder."""
    tmp = tmp_path_factory.mktemp("batch-example")
    spec = load_spec(EXAMPLES / "batch.yaml")
    spec = spec.model_copy(update={
        "output": spec.output.model_copy(update={"path": str(tmp / "out")}),
        "storage": spec.storage.model_copy(update={"root": str(tmp / "store")}),
        "input": spec.input.model_copy(update={"path": str(EXAMPLES / "data" / "corpus.jsonl")}),
    })
    result = run_batch(spec)
    return spec, result, tmp / "out"


@pytest.mark.timeout(600)
def test_example_output_is_complete(example_run):
    spec, result, out = example_run
    assert result.ok, result.problems
    assert (result.rows_in, result.shards_total, result.shards_skipped) == (1000, 10, 0)
    assert result.rows_out + result.rows_error == 1000 and result.rows_error == 3
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == [r["id"] for r in sample_corpus(1000)]  # every id exactly once
    ok_rows = [r for r in rows if not r["error"]]
    # A random model sometimes emits only special tokens (skipped in the text), so some texts are "".
    assert all(isinstance(r["output"], str) and 1 <= r["num_output_tokens"] <= spec.sampling.max_tokens
               for r in ok_rows)
    assert sum(bool(r["output"]) for r in ok_rows) > 0.9 * len(ok_rows)
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["complete"] and manifest["rows_in"] == 1000 and manifest["rows_error"] == 3
    assert [s["status"] for s in manifest["shards"]] == ["committed"] * 10


@pytest.mark.timeout(600)
@pytest.mark.timeout(300)
def test_dashboard_batch_panels_query_exported_metrics(example_run):
    """The run's rows and tokens reached Ray's metrics port, under the names the dashboard queries."""
    from tests.dashboard import assert_rows_exported, metrics_url, sample_values

    spec, result, _ = example_run
    assert_rows_exported("Batch")
    url, deadline = metrics_url(), time.monotonic() + 30
    while True:  # the driver exports every few seconds; the last shards may be one export behind
        counted = (sum(sample_values(url, "ray_raylane_batch_rows_total", job=spec.name)),
                   sum(sample_values(url, "ray_raylane_batch_output_tokens_total", job=spec.name)))
        if counted == (result.rows_in, result.output_tokens) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert counted == (result.rows_in, result.output_tokens)


def test_outliers_become_error_rows(example_run):
    _, _, out = example_run
    by_id = {r["id"]: r for r in _rows(out)}
    assert by_id["doc-00003"]["error"] == "empty prompt"
    assert by_id["doc-00007"]["error"] == "empty prompt: null"
    assert by_id["doc-00009"]["error"].startswith("prompt too long")
    assert by_id["doc-00009"]["output"] is None
    assert by_id["doc-00010"]["error"] is None


@pytest.mark.timeout(600)
def test_rerun_of_a_complete_output_runs_nothing(example_run):
    spec, _, out = example_run
    before = {p.name: p.read_bytes() for p in (out / "_commits").iterdir()}
    again = run_batch(spec)
    assert again.ok and again.shards_skipped == 10 and again.shards_run == 0 and again.rows_run == 0
    assert {p.name: p.read_bytes() for p in (out / "_commits").iterdir()} == before


@pytest.mark.timeout(600)
def test_verify_catches_deleted_and_truncated_files(example_run, tmp_path):
    _, _, out = example_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    ok = run_cli("batch", "verify", str(copy), "--json", timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stderr
    (copy / "shard-00004.jsonl").unlink()
    f = copy / "shard-00007.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:-5]))  # whole lines gone: still parses, ids don't match
    bad = run_cli("batch", "verify", str(copy), "--json", timeout=120)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    text = "\n".join(report["problems"])
    assert "shard-00004.jsonl: committed but the file is missing" in text
    assert "shard-00007.jsonl" in text and "truncated" in text
    assert report["ok"] is False


@pytest.fixture(scope="module")
def lora_adapter(tiny_model, tmp_path_factory) -> Path:
    """A random-init LoRA adapter on the tiny model (init_lora_weights=False so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    get_peft_model(base, cfg).save_pretrained(path)
    return path


@pytest.mark.timeout(600)
def test_quickstart_stage_with_lora_adapter_changes_outputs(example_run, lora_adapter, tiny_model, tmp_path):
    from runtime.batch.quickstart import stage_batch
    from runtime.quickstart import QuickstartContext

    _, _, base_out = example_run
    ctx = QuickstartContext(workdir=tmp_path, model_dir=tiny_model, adapter_dir=lora_adapter)
    done = stage_batch(ctx)
    assert done["verified"] and done["rows_in"] == 200 and done["rows_error"] == 3
    assert done["adapter"] == str(lora_adapter)
    # Same prompts, model weights and sampling as the example run: only the adapter differs.
    base = {r["id"]: r["output"] for r in _rows(base_out)}
    lora = {r["id"]: r["output"] for r in _rows(tmp_path / "batch" / "output") if not r["error"]}
    differ = sum(lora[i] != base[i] for i in lora)
    assert differ >= 0.8 * len(lora), f"only {differ}/{len(lora)} outputs changed with the adapter"


def _engine_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # Name this session's cluster: other local clusters may run on the same machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         detail=True, raise_on_missing_output=False)
    return [a.pid for a in actors if "MapWorker" in (a.class_name or "") and a.pid]


@pytest.mark.timeout(900)
def test_killed_engine_worker_gives_exactly_one_row_per_id(ray_local, tiny_model, tmp_path):
    corpus = tmp_path / "chat.jsonl"
    n = 1200
    corpus.write_text("".join(
        json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": f"question {i} about ray"}]}) + "\n"
        for i in range(n)))
    out = tmp_path / "out"
    spec = parse_spec(_spec_dict("kill-worker", corpus, out, tiny_model, tmp_path,
                                 input={"path": str(corpus), "messages_column": "messages"}))
    killed: list[int] = []
    kill_time: list[float] = []
    finished = threading.Event()  # the killer never outlives this test

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed and not finished.is_set():
            done = len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0
            if done >= 1:
                for pid in _engine_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                kill_time.append(time.time())
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        result = run_batch(spec)
    finally:
        finished.set()
        t.join(timeout=5)
    assert killed, "the engine worker was never killed"
    commits = sh.read_commits(str(out))
    assert len(commits) == 12
    assert any(c.committed_at > kill_time[0] for c in commits.values()), "no shard committed after the kill"
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == n and sorted(ids) == sorted(f"c{i}" for i in range(n))
    assert result.ok and result.rows_out == n, result.problems
    assert verify_output(str(out)).ok


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job and everything it started (its own session: Ray, the engine)."""
    import psutil

    sid = proc.pid
    os.killpg(sid, signal.SIGKILL)
    proc.wait(timeout=60)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, psutil.Error, OSError):
            pass


@pytest.mark.timeout(900)
def test_killed_driver_rerun_runs_only_missing_shards(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", n=2000, seed=1)
    out = tmp_path / "out"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec_dict("kill-driver", corpus, out, tiny_model, tmp_path)))
    env = {**os.environ, "RAYLANE_STORAGE_ROOT": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.batch_infer", "--spec", str(spec_file)], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (out / "_commits").exists() and len(list((out / "_commits").glob("*.json"))) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"job ended before it could be killed: {(tmp_path / 'first.log').read_text()[-2000:]}"
    finally:
        _kill_group(proc)
        log.close()
    first = sh.read_commits(str(out))
    assert 3 <= len(first) < 20, f"{len(first)} shards committed before the kill"
    assert verify_output(str(out)).ok is False  # a partial output never passes
    # The killed driver never released its lease; still unexpired, but its process is gone, so
    # the rerun on this machine takes it over at once instead of waiting out the expiry.
    lease = json.loads((out / "_lease.json").read_text())
    assert lease["pid"] == proc.pid and lease["expires_at"] > time.time()

    rerun = run_cli("run", str(spec_file), "--json", timeout=800, env={"RAYLANE_STORAGE_ROOT": str(tmp_path)})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["ok"] and result["shards_skipped"] == len(first) and result["shards_run"] == 20 - len(first)
    assert result["rows_in"] == result["rows_out"] + result["rows_error"] == 2000
    assert not (out / "_lease.json").exists()  # released by the rerun
    after = sh.read_commits(str(out))
    # Committed shards were not touched; every other shard was run once, by the rerun.
    assert {i: after[i] for i in first} == first
    assert {c.run_id for i, c in after.items() if i not in first} == {result["run_id"]}
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == len(set(ids)) == 2000


def _engine_cores() -> list:
    """vLLM's EngineCore processes among the engine actors' children (psutil.Process objects)."""
    import psutil

    cores = []
    for pid in _engine_pids():
        try:
            cores += [c for c in psutil.Process(pid).children(recursive=True)
                      if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
        except psutil.Error:
            continue
    return cores


@pytest.mark.timeout(600)
def test_a_killed_then_a_stalled_engine_core_never_hang_the_job(ray_local, tiny_model, tmp_path):
    """Issue 14 item 6 in one run (one corpus, three engine starts): SIGKILL the EngineCore after
    the first commit (the actor exits, Ray starts a new one, its rows re-run), then SIGSTOP the
    replacement's EngineCore (it never fails a request: the shard deadline must trip)."""
    import psutil

    corpus = tmp_path / "in.jsonl"
    n = 1000
    corpus.write_text("".join(json.dumps({"id": f"k{i}", "prompt": f"question {i} about ray"}) + "\n"
                              for i in range(n)))
    out = tmp_path / "out"
    # 200 tokens a row: on an idle machine 24 tokens a row finish every row within a second of the
    # first commit, leaving the saboteur nothing to kill mid-run.
    spec = parse_spec(_spec_dict("kill-core", corpus, out, tiny_model, tmp_path, shard_deadline_s=20,
                                 sampling={"max_tokens": 200, "ignore_eos": True}))
    events: dict[str, float] = {}
    stopped: list = []
    finished = threading.Event()  # the saboteur never outlives this test (it would hit the next one's engines)

    def commits_after(t: float) -> int:
        return sum(c.committed_at > t for c in sh.read_commits(str(out)).values()) if (out / "_commits").exists() else 0

    def saboteur():
        deadline = time.time() + 500
        while time.time() < deadline and not finished.is_set():
            if "kill" not in events and commits_after(0) >= 1:
                cores = _engine_cores()
                if cores:
                    for c in cores:
                        c.kill()
                    events["kill"] = time.time()
            elif "kill" in events and "stop" not in events and commits_after(events["kill"]) >= 1:
                cores = _engine_cores()
                if cores:
                    for c in cores:
                        c.suspend()  # SIGSTOP
                    stopped.extend(cores)
                    events["stop"] = time.time()
                    return
            time.sleep(0.2)

    t = threading.Thread(target=saboteur, daemon=True)
    t.start()
    try:
        result = run_batch(spec)
    finally:
        finished.set()
        t.join(timeout=5)
    assert "kill" in events and "stop" in events, f"the saboteur did not get both in: {events}"
    commits = sh.read_commits(str(out))
    assert len(commits) == 10 and any(c.committed_at > events["stop"] for c in commits.values())
    # The stopped engine was replaced, not waited for: it is gone.
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stopped)
    ids = [r["id"] for r in _rows(out)]  # every output file, read back
    assert len(ids) == n and sorted(ids) == sorted(f"k{i}" for i in range(n))
    assert result.ok and result.rows_out + result.rows_error == n, result.problems
    assert result.rows_error == 0  # a dead engine's rows re-ran; none became "engine error" rows
