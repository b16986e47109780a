"""A batch output folder's guarantees across reruns, without Ray or vLLM: the plan pins the
input and the generation, one writer holds the folder's lease, damaged shards repair themselves.

These run the real runner (``run_batch``: plan, lease, commit, manifest, verify) and the real
data-plane functions (digests, prepare, ``ShardWriter``) in-process: the Ray tasks run in this
process (``LocalExecutor``) and the engine stage is replaced by one that answers every row
(``_Engine``); nothing here claims that vLLM generated anything or that Ray distributed it. The lease tests take the lease through a real first run that blocks in
its engine stage, or through ``OutputLease`` directly (said per test).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from runtime.batch import plane as pl
from runtime.batch import runner
from runtime.batch import shards as sh
from runtime.batch.engine import ID, SHARD, engine_row, load_tokenizer
from runtime.batch.lease import LEASE, LeaseHeld, OutputLease
from runtime.errors import RaylaneError
from runtime.specs import parse_spec
from tests.conftest import run_cli

ROWS, PER = 9, 3


def _corpus(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int = ROWS) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(n)]


def _spec_dict(tmp: Path, model: Path, **over) -> dict:
    d = {"kind": "BatchInference", "name": "pin", "model": str(model),
         "input": {"path": str(tmp / "in.jsonl")}, "output": {"path": str(tmp / "out"), "format": "jsonl"},
         "rows_per_shard": PER, "max_model_len": 64, "storage": {"root": str(tmp / "store")}}
    d.update(over)
    return d


def _spec(tmp: Path, model: Path, **over):
    return parse_spec(_spec_dict(tmp, model, **over))


class _Engine:
    """Stands in for the vLLM stage: answers every row it is given and records which."""

    def __init__(self):
        self.seen: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.block = False

    def __call__(self, spec, address, plan, run):
        self.started.set()
        if self.block:
            assert self.release.wait(60), "the test never released the engine"
        tok = load_tokenizer(plan.model_dir)
        writer = pl.ShardWriter(*run.writer_args())
        for i in plan.pending:
            errors, rows = pl.prepare_shard(spec, tok, plan.root, plan.in_fmt, i, plan.pieces[i], plan.text_col)
            writer.add({i: errors})
            for r in rows:
                self.seen.append(r[ID])
            writer.add({i: [engine_row({ID: r[ID], SHARD: r[SHARD], "generated_text": f"out {r[ID]}",
                                        "num_input_tokens": len(r["tokenized_prompt"]), "num_generated_tokens": 1})
                            for r in rows]})
            records, lost = writer.drain()
            for rec in records:
                run.on_commit(rec)
            if lost:
                raise LeaseHeld(lost)
            run.lease.check()


@contextlib.contextmanager
def _local_executor(address, spec=None):
    yield pl.LocalExecutor()


@pytest.fixture
def engine(monkeypatch) -> _Engine:
    e = _Engine()
    monkeypatch.setattr(runner, "_run_engine", e)
    monkeypatch.setattr(runner, "_executor", _local_executor)
    return e


@pytest.fixture
def first_run(tmp_path, tiny_model, engine):
    """One complete run into tmp/out; returns (spec, result)."""
    _corpus(tmp_path / "in.jsonl", _rows())
    spec = _spec(tmp_path, tiny_model)
    result = runner.run_batch(spec)
    assert result.ok, result.problems
    assert result.shards_run == ROWS // PER
    engine.seen.clear()
    engine.started.clear()
    return spec, result


def _folder_state(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 2. The plan pins the input and the generation


def test_plan_pins_per_shard_digests_and_the_generation(first_run, tmp_path):
    plan = sh.read_plan(str(tmp_path / "out"))
    assert plan.version == sh.PLAN_VERSION and plan.shards == 3
    assert len(plan.shard_ids_sha256) == len(plan.shard_prompts_sha256) == 3
    # Per shard, from that shard's rows alone (what a worker holding one shard would compute).
    rows = _rows()
    assert (plan.shard_ids_sha256[1], plan.shard_prompts_sha256[1]) == sh.shard_digests(
        [r["id"] for r in rows[3:6]], [r["prompt"] for r in rows[3:6]])
    g = plan.generation
    assert g["sampling"]["temperature"] == 0.0 and g["max_model_len"] == 64 and g["prompt_limit"] == 63
    assert g["model"]["files_sha256"] and g["adapter"] is None
    assert plan.generation_sha256 == sh.generation_digest(g)


@pytest.mark.parametrize("change, expect", [
    ("reverse", "input order (the same ids, in another order: shards 0, 1, 2)"),
    ("edit", "prompt content (shards 1)"),
    ("temperature", "generation config: sampling.temperature (0.0 -> 0.7)"),
    ("max_prompt_tokens", "generation config: prompt_limit (63 -> 10)"),
    ("other_ids", "input ids (other ids than the first run's)"),
])
def test_a_changed_input_or_generation_is_refused_before_any_work(first_run, tmp_path, tiny_model, engine,
                                                                  change, expect):
    out = tmp_path / "out"
    before = _folder_state(out)
    rows, over = _rows(), {}
    if change == "reverse":
        rows = rows[::-1]
    elif change == "edit":
        rows[4]["prompt"] = "an edited prompt"
    elif change == "temperature":
        over = {"sampling": {"temperature": 0.7}}
    elif change == "max_prompt_tokens":
        over = {"max_prompt_tokens": 10}
    else:
        rows[8]["id"] = "r-new"
    _corpus(tmp_path / "in.jsonl", rows)
    with pytest.raises(RaylaneError) as e:
        runner.run_batch(_spec(tmp_path, tiny_model, **over))
    msg = str(e.value)
    assert "holds shards of a different run" in msg and expect in msg
    assert "new output.path" in msg
    assert engine.seen == [] and not engine.started.is_set()
    assert _folder_state(out) == before  # nothing written, not even a lease left behind


def test_throughput_only_engine_kwargs_may_change_between_runs(first_run, tmp_path, tiny_model, engine):
    again = runner.run_batch(_spec(tmp_path, tiny_model, engine_kwargs={"max_num_seqs": 4}))
    assert again.ok and again.shards_run == 0
    with pytest.raises(RaylaneError, match=r"engine_kwargs.dtype \(None -> 'float32'\)"):
        runner.run_batch(_spec(tmp_path, tiny_model, engine_kwargs={"dtype": "float32"}))


def test_a_refused_rerun_through_the_cli_names_the_change_without_a_traceback(first_run, tmp_path, tiny_model):
    _corpus(tmp_path / "in.jsonl", _rows()[::-1])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec_dict(tmp_path, tiny_model)))
    r = run_cli("run", str(spec_file), timeout=300)
    assert r.returncode == 1
    assert "input order" in r.stderr and "new output.path" in r.stderr and "Traceback" not in r.stderr


def test_a_version_1_plan_is_upgraded_when_its_own_checks_pass(first_run, tmp_path, tiny_model):
    out = tmp_path / "out"
    plan = json.loads((out / sh.PLAN).read_text())
    v1 = {k: plan[k] for k in ("input", "rows", "rows_per_shard", "shards", "ids_sha256", "output_format",
                               "id_column", "input_format")}
    (out / sh.PLAN).write_text(json.dumps(v1))
    assert sh.verify_output(str(out)).ok  # verify reads a version-1 plan as it always did
    again = runner.run_batch(_spec(tmp_path, tiny_model))
    assert again.ok and again.shards_run == 0
    upgraded = json.loads((out / sh.PLAN).read_text())
    assert upgraded["version"] == 2 and upgraded["upgraded_from"] == 1
    assert upgraded["shard_ids_sha256"] == plan["shard_ids_sha256"]
    # From now on it is pinned: a changed temperature is refused.
    with pytest.raises(RaylaneError, match="sampling.temperature"):
        runner.run_batch(_spec(tmp_path, tiny_model, sampling={"temperature": 0.5}))
    # A version-1 plan whose own checks fail is refused as before.
    (out / sh.PLAN).write_text(json.dumps({**v1, "rows_per_shard": 4}))
    with pytest.raises(RaylaneError, match=r"rows_per_shard \(4 -> 3\)"):
        runner.run_batch(_spec(tmp_path, tiny_model))


def test_a_plan_from_a_newer_raylane_or_an_unreadable_plan_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / sh.PLAN).write_text(json.dumps({"version": 99}))
    with pytest.raises(RaylaneError, match="newer raylane"):
        sh.verify_output(str(out))
    (out / sh.PLAN).write_text("{not json")
    with pytest.raises(RaylaneError, match="not a readable shard plan"):
        sh.verify_output(str(out))


def test_model_version_follows_the_files_not_the_path(tmp_path, tiny_model):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert runner.model_version(str(copy)) == runner.model_version(str(tiny_model))
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
    assert runner.model_version(str(copy)) != runner.model_version(str(tiny_model))
    assert runner.model_version("s3://b/m") == {"uri": "s3://b/m"}


# ---------------------------------------------------------------------------------------------
# 3. One writer per output folder


def test_a_second_run_while_the_first_holds_the_lease_is_refused(tmp_path, tiny_model, engine):
    """The first run is a real run_batch, parked inside its engine stage (so holding the lease)."""
    _corpus(tmp_path / "in.jsonl", _rows())
    engine.block = True
    results: dict = {}
    first = threading.Thread(target=lambda: results.update(r=runner.run_batch(_spec(tmp_path, tiny_model))))
    first.start()
    try:
        assert engine.started.wait(120)
        lease = json.loads((tmp_path / "out" / LEASE).read_text())
        with pytest.raises(LeaseHeld) as e:
            runner.run_batch(_spec(tmp_path, tiny_model))
        assert f"run {lease['holder']}" in str(e.value) and "--wait" in str(e.value)
    finally:
        engine.release.set()
        first.join(120)
    assert results["r"].ok and results["r"].shards_run == 3
    assert engine.seen == [f"r{i}" for i in range(ROWS)]  # the refused run generated nothing
    assert not (tmp_path / "out" / LEASE).exists()  # released at the end
    assert sh.verify_output(str(tmp_path / "out")).ok


def test_with_wait_a_second_run_queues_behind_the_first(tmp_path, tiny_model, engine, monkeypatch):
    """Real runs both: the second waits for the lease, then finds everything committed."""
    from runtime.batch import lease as lease_mod

    monkeypatch.setattr(lease_mod, "POLL_S", 0.1)
    _corpus(tmp_path / "in.jsonl", _rows())
    engine.block = True
    results: dict = {}
    first = threading.Thread(target=lambda: results.update(a=runner.run_batch(_spec(tmp_path, tiny_model))))
    first.start()
    assert engine.started.wait(120)
    second = threading.Thread(
        target=lambda: results.update(b=runner.run_batch(_spec(tmp_path, tiny_model), wait=True)))
    second.start()
    time.sleep(1.0)
    assert second.is_alive() and "b" not in results  # waiting, not refused
    engine.release.set()
    first.join(120)
    second.join(120)
    assert results["a"].shards_run == 3 and results["b"].ok and results["b"].shards_run == 0


def test_lease_api_exclusive_expiry_takeover_heartbeat_and_loss(tmp_path):
    """OutputLease directly (no run): local exclusive create and takeover."""
    out = str(tmp_path / "out")
    a = OutputLease(out, "run-a", ttl_s=1.5).acquire()
    with pytest.raises(LeaseHeld, match="run run-a"):
        OutputLease(out, "run-b").acquire()
    time.sleep(2.5)  # beyond the ttl, but a's heartbeat (every 0.5 s) keeps it alive
    with pytest.raises(LeaseHeld, match="run run-a"):
        OutputLease(out, "run-b").acquire()
    # a dies without releasing: its heartbeat stops, the lease expires, b takes it over.
    a._stop.set()
    a._thread.join()
    time.sleep(1.6)
    b = OutputLease(out, "run-b", ttl_s=30).acquire()
    assert json.loads((tmp_path / "out" / LEASE).read_text())["holder"] == "run-b"
    # Only one taker per expired lease: the marker for a's token is b's.
    assert (tmp_path / "out" / f"{LEASE}.takeover-{a.token}").exists()
    with pytest.raises(LeaseHeld, match="run run-b"):
        OutputLease(out, "run-c").acquire()
    b.release()
    assert not (tmp_path / "out" / LEASE).exists()
    assert not (tmp_path / "out" / f"{LEASE}.takeover-{a.token}").exists()
    # A holder whose lease was taken over notices at its next heartbeat and stops committing.
    c = OutputLease(out, "run-c", ttl_s=0.6).acquire()
    (tmp_path / "out" / LEASE).write_text(json.dumps({**json.loads((tmp_path / "out" / LEASE).read_text()),
                                                      "token": "someone-else", "holder": "run-d"}))
    time.sleep(1.5)  # several heartbeats (every 0.2 s)
    with pytest.raises(LeaseHeld, match="lost the lease.*run-d"):
        c.check()
    c.release()
    assert json.loads((tmp_path / "out" / LEASE).read_text())["holder"] == "run-d"  # not c's to delete


def test_a_stale_lease_from_a_killed_run_does_not_block_forever(tmp_path, tiny_model, engine):
    """A lease file left by a dead driver (written directly), already expired: the run takes over."""
    _corpus(tmp_path / "in.jsonl", _rows())
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE).write_text(json.dumps({"holder": "dead", "token": "t0", "host": "h", "pid": 1, "taken_at": 0,
                                         "heartbeat_at": 0, "expires_at": time.time() - 1, "ttl_s": 120}))
    r = runner.run_batch(_spec(tmp_path, tiny_model))
    assert r.ok and r.shards_run == 3 and not (out / LEASE).exists()


def test_raycronjob_says_how_overlapping_ticks_behave(tmp_path):
    from cluster import crds
    from cluster.render import OVERLAP_ANNOTATION, render

    spec = parse_spec({"kind": "BatchInference", "name": "nightly", "model": "tiny", "schedule": "0 2 * * *",
                       "input": {"path": "s3://b/in"}, "output": {"path": "s3://b/out"}})
    (cron,) = [d for d in render(spec) if d["kind"] == "RayCronJob"]
    assert "Forbid" in cron["metadata"]["annotations"][OVERLAP_ANNOTATION]
    # Why an annotation and not a field: the RayCronJob CRD raylane checks against has no
    # concurrencyPolicy. If a KubeRay release adds one, this fails and the field should be rendered.
    d = crds.crd_dir()
    if d is not None:
        schema = yaml.safe_load((Path(d) / "ray.io_raycronjobs.yaml").read_text())
        (v1,) = [v for v in schema["spec"]["versions"] if v["name"] == "v1"]
        assert "concurrencyPolicy" not in v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


# ---------------------------------------------------------------------------------------------
# 4. Shards that repair themselves


def test_a_deleted_and_a_truncated_shard_are_re_run(first_run, tmp_path, tiny_model, engine):
    out = tmp_path / "out"
    (out / "shard-00000.jsonl").unlink()
    f = out / "shard-00002.jsonl"
    f.write_bytes(f.read_bytes()[:-7])
    assert not sh.verify_output(str(out)).ok
    again = runner.run_batch(_spec(tmp_path, tiny_model))
    assert again.ok, again.problems
    assert (again.shards_run, again.shards_skipped) == (2, 1)
    assert sorted(engine.seen) == ["r0", "r1", "r2", "r6", "r7", "r8"]  # only the damaged shards' rows
    text = "\n".join(again.repaired)
    assert "shard-00000.jsonl: committed but the file is missing" in text
    assert "shard-00002.jsonl" in text and "truncated" in text
    report = run_cli("batch", "verify", str(out), "--json", timeout=120)
    assert report.returncode == 0 and json.loads(report.stdout)["ok"], report.stdout + report.stderr


def test_a_corrupt_shard_of_the_same_size_is_re_run(first_run, tmp_path, tiny_model, engine):
    f = tmp_path / "out" / "shard-00001.jsonl"
    data = bytearray(f.read_bytes())
    data[10] = ord("X") if data[10] != ord("X") else ord("Y")
    f.write_bytes(bytes(data))
    again = runner.run_batch(_spec(tmp_path, tiny_model))
    assert again.ok and again.shards_run == 1 and sorted(engine.seen) == ["r3", "r4", "r5"]


def test_unreadable_and_stray_commit_records_are_problems_not_crashes(first_run, tmp_path, tiny_model, engine):
    out = tmp_path / "out"
    (out / "_commits" / "shard-00001.json").write_text("{torn")
    stray = out / "_commits" / "shard-00007.json"
    stray.write_text((out / "_commits" / "shard-00000.json").read_text().replace('"shard": 0', '"shard": 7'))
    report = sh.verify_output(str(out))
    text = "\n".join(report.problems)
    assert not report.ok
    assert "_commits/shard-00001.json: unreadable commit record" in text
    assert "_commits/shard-00007.json: stray commit record, outside the plan's 3 shards" in text
    again = runner.run_batch(_spec(tmp_path, tiny_model))
    assert again.shards_run == 1 and sorted(engine.seen) == ["r3", "r4", "r5"]  # the unreadable one re-ran
    assert any("unreadable" in r for r in again.repaired)
    # The stray record is still reported (a rerun cannot know whose it is), nothing crashed.
    assert not again.ok and any("stray" in p for p in again.problems)
    stray.unlink()
    assert sh.verify_output(str(out)).ok


def test_a_local_commit_syncs_the_folder(tmp_path, monkeypatch):
    from runtime import storage

    synced: list[str] = []
    real = storage.fsync_dir
    monkeypatch.setattr(storage, "fsync_dir", lambda p: (synced.append(p), real(p)))
    sh.commit_shard(str(tmp_path / "out"), "jsonl", 0, [{"id": "a", "output": "x", "error": None}], "run-1")
    out = str((tmp_path / "out").resolve())
    assert synced == [out, f"{out}/_commits"]  # the shard file's folder, then the record's


def test_a_lease_whose_process_died_on_this_machine_is_taken_over_at_once(tmp_path):
    """OutputLease directly: a killed driver's lease (unexpired) does not make an immediate rerun wait."""
    import subprocess
    import sys

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    a = OutputLease(str(out), "run-a", ttl_s=3600).acquire()
    a._stop.set()
    a._thread.join()
    held = json.loads((out / LEASE).read_text())
    (out / LEASE).write_text(json.dumps({**held, "pid": int(dead.stdout)}))  # as if its driver was killed
    b = OutputLease(str(out), "run-b").acquire()
    assert json.loads((out / LEASE).read_text())["holder"] == "run-b"
    b.release()
    # A live process on this machine (this one) is respected until the lease expires.
    (out / LEASE).write_text(json.dumps(held))
    with pytest.raises(LeaseHeld, match="run run-a"):
        OutputLease(str(out), "run-c").acquire()


# ---------------------------------------------------------------------------------------------
# 5. Scheduled runs that work tick after tick


def test_two_ticks_over_a_growing_folder_each_write_their_own_verified_folder(tmp_path, tiny_model, engine):
    from datetime import UTC, datetime

    inp = tmp_path / "in"
    inp.mkdir()
    rows = _rows(12)
    _corpus(inp / "a.jsonl", rows[:5])
    spec = _spec(tmp_path, tiny_model, input={"path": str(inp), "incremental": True},
                 output={"path": str(tmp_path / "out" / "{date}"), "format": "jsonl"}, schedule="0 2 * * *")
    day = [datetime(2026, 12, d, 2, 0, tzinfo=UTC) for d in (1, 2, 3)]

    t1 = runner.run_batch(spec, now=day[0])
    assert t1.ok and t1.output == str(tmp_path / "out" / "2026-12-01") and t1.rows_in == 5
    _corpus(inp / "b.jsonl", rows[5:9])  # the folder grows between ticks
    engine.seen.clear()
    t2 = runner.run_batch(spec, now=day[1])
    assert t2.ok and t2.output == str(tmp_path / "out" / "2026-12-02")
    assert t2.rows_in == 4 and sorted(engine.seen) == sorted(r["id"] for r in rows[5:9])  # only the new file
    assert [Path(f).name for f in t2.input_files] == ["b.jsonl"]
    for out in (t1.output, t2.output):
        v = run_cli("batch", "verify", out, "--json", timeout=120)
        assert v.returncode == 0 and json.loads(v.stdout)["checked_against_input"], v.stdout + v.stderr

    # A retry of tick 2 (same day) finishes tick 2's own files, even though c.jsonl arrived since.
    _corpus(inp / "c.jsonl", rows[9:])
    engine.seen.clear()
    again = runner.run_batch(spec, now=day[1].replace(hour=5))
    assert again.ok and again.shards_run == 0 and again.input_files == t2.input_files and engine.seen == []
    # The next tick takes c.jsonl; the one after finds nothing new and writes no folder.
    t3 = runner.run_batch(spec, now=day[2])
    assert t3.ok and t3.rows_in == 3
    empty = runner.run_batch(spec, now=datetime(2026, 12, 4, 2, 0, tzinfo=UTC))
    assert empty.ok and empty.rows_in == 0 and not (tmp_path / "out" / "2026-12-04").exists()


def test_output_placeholders_are_checked_and_kept_for_the_cluster():
    from cluster.render import render_yaml

    base = {"kind": "BatchInference", "name": "nightly", "model": "tiny", "schedule": "0 2 * * *",
            "input": {"path": "s3://b/in/"}}
    with pytest.raises(RaylaneError, match=r"output.path: unknown placeholder \{day\}"):
        parse_spec({**base, "output": {"path": "s3://b/out/{day}"}})
    with pytest.raises(RaylaneError, match="input.incremental: .*put \\{date\\}"):
        parse_spec({**base, "input": {"path": "s3://b/in/", "incremental": True}, "output": {"path": "s3://b/o"}})
    spec = parse_spec({**base, "input": {"path": "s3://b/in/", "incremental": True},
                       "output": {"path": "s3://b/out/{date}"}})
    assert "s3://b/out/{date}" in render_yaml(spec)  # filled in by each tick, not at render time


def test_an_incremental_schedule_needs_a_folder_per_tick():
    base = {"kind": "BatchInference", "name": "n", "model": "tiny", "input": {"path": "in/", "incremental": True}}
    ok = [("{date}", "0 2 * * *"), ("{datetime}", "*/10 * * * *"), ("{date}/{time}", "0 * * * *")]
    for path, schedule in ok:
        parse_spec({**base, "output": {"path": f"out/{path}"}, "schedule": schedule})
    with pytest.raises(RaylaneError, match="fires more than once a day"):
        parse_spec({**base, "output": {"path": "out/{date}"}, "schedule": "0 */6 * * *"})
    with pytest.raises(RaylaneError, match=r"\{time\} alone repeats every day"):
        parse_spec({**base, "output": {"path": "out/{time}"}, "schedule": "0 2 * * *"})


def test_jobs_batch_wait_flag_queues_behind_a_held_lease(tmp_path, tiny_model, engine, monkeypatch, capsys):
    """``python -m jobs.batch`` in-process (engine stubbed): the lease is held through OutputLease
    directly and released after a moment; without --wait the job exits 1, with it the job finishes."""
    from jobs.batch import main
    from runtime.batch import lease as lease_mod

    monkeypatch.setattr(lease_mod, "POLL_S", 0.1)
    _corpus(tmp_path / "in.jsonl", _rows())
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec_dict(tmp_path, tiny_model)))
    other = OutputLease(str(tmp_path / "out"), "other-run").acquire()
    assert main(["--spec", str(spec_file)]) == 1
    assert "being written by another run other-run" in capsys.readouterr().err
    threading.Timer(1.0, other.release).start()
    assert main(["--spec", str(spec_file), "--wait"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_run"] == 3
