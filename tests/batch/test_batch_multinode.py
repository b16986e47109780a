"""Batch inference on a multi-node Ray cluster (``runtime.testing``): a head with 0 CPUs, a CPU
node (2 logical CPUs, label pool=cpu) and an engine node (1 logical CPU, label pool=engine).

The spec places the CPU side (prepare actors, plan and verify tasks, the writer) with
``prep_node_labels`` and the vLLM engine with ``engine_node_labels``. In order, on one cluster:

1. a run completes and verifies, and every actor ran where the labels say (the GCS actor table:
   each actor's node and process, the process title naming the stage it hosts);
2. mid-run (shards committed, one in the writer's memory), the engine's node is removed abruptly
   and the writer's process SIGKILLed at the same moment (as if it had been on that node); a
   replacement engine node joins. Ray restarts the engine there and the writer on the CPU node;
   a finishing pass reruns the shards whose rows the old writer held. Every id comes out exactly
   once (read from every output file), no shard committed before the fault is redone, and no
   vLLM process of the removed node is left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from runtime.batch import shards as sh
from runtime.specs import parse_spec
from runtime.testing import NodeSpec
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

POOL = "raylane.test/pool"
CPU_NODE = NodeSpec(cpus=2, labels={POOL: "cpu"})
ENGINE_NODE = NodeSpec(cpus=1, labels={POOL: "engine"})
PER = 25  # rows per shard


@pytest.fixture(scope="module")
def local_cluster_nodes():
    return [CPU_NODE, ENGINE_NODE]


@pytest.fixture(scope="module")
def driver(local_cluster):
    """One driver connection for the module; each run's ray_session attaches to it."""
    from runtime.ray_env import init_ray, shutdown_ray

    init_ray(local_cluster.address)
    yield local_cluster
    shutdown_ray()


def _spec(tmp: Path, model: Path, name: str, n: int, empty_every: int = 0, **over):
    """``empty_every``: every k-th prompt empty (an error row, which the prepare stage hands to the
    writer at once: the writer then holds that shard in memory until its engine rows arrive)."""
    corpus = tmp / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"{name}-{i}", "prompt": "" if empty_every and i % empty_every == 0
                                          else f"question {i} about ray"}) + "\n" for i in range(n)))
    d = {
        "kind": "BatchInference", "name": name, "model": str(model),
        "input": {"path": str(corpus)}, "output": {"path": str(tmp / name), "format": "jsonl"},
        "sampling": {"max_tokens": 8, "ignore_eos": True}, "rows_per_shard": PER, "max_model_len": 128,
        "storage": {"root": str(tmp / "store")}, "resources": {"cpus_per_worker": 1},
        # Few rows in flight, so shards commit one after another and the fault lands mid-run.
        "batch_size": 8, "max_concurrent_batches": 2,
        "prep_cpus": 0.5, "prep_node_labels": {POOL: "cpu"}, "engine_node_labels": {POOL: "engine"},
    }
    d.update(over)
    return parse_spec(d)


def _rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("shard-*.jsonl")):
        rows += sh.decode_rows(f.read_bytes(), "jsonl")
    return rows


def _stage(title: str, pid: int) -> str:
    if _vllm_processes(pid):
        return "engine"  # the actor hosting a vLLM engine, whatever its process title says
    for key, stage in (("Prepare", "prepare"), ("Forward", "forward"), ("ShardWriter", "writer")):
        if key in title:
            return stage
    return "other"


class Placement:
    """Samples the GCS actor table while a run goes: stage -> the nodes its live actors ran on."""

    def __init__(self):
        self.seen: dict[str, set[str]] = {}
        self.titles: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.5)

    def sample(self):
        import psutil
        import ray

        for a in ray._private.state.actors().values():
            if a["State"] == "DEAD" or not a["Pid"]:  # an engine is PENDING_CREATION while it starts
                continue
            try:
                title = a["ActorClassName"] + " " + " ".join(psutil.Process(a["Pid"]).cmdline())
            except psutil.Error:
                continue
            stage = _stage(title, a["Pid"])
            self.seen.setdefault(stage, set()).add(a["Address"]["NodeID"])
            self.titles.setdefault(stage, title[:120])


@pytest.mark.timeout(300)
def test_engine_and_cpu_stage_run_on_their_own_nodes_and_the_output_verifies(driver, tiny_model, tmp_path):
    from runtime.batch import run_batch

    cluster = driver
    cpu, engine = (w.node_id for w in cluster.workers)
    spec = _spec(tmp_path, tiny_model, "mn-place", 4 * PER)
    t0 = time.monotonic()
    with Placement() as seen:
        result = run_batch(spec, address=cluster.address)
    print(f"\n[multinode batch] placement run {time.monotonic() - t0:.1f} s; actors seen: {seen.titles}")
    assert result.ok and result.rows_in == result.rows_out == 4 * PER, result.problems
    assert seen.seen.get("engine") == {engine}, seen.seen
    assert seen.seen.get("prepare") == {cpu} and seen.seen.get("writer") == {cpu}, seen.seen
    assert seen.seen.get("forward", {cpu}) == {cpu}, seen.seen
    ids = [r["id"] for r in _rows(Path(spec.output_path()))]
    assert sorted(ids) == sorted(f"mn-place-{i}" for i in range(4 * PER))
    verify = run_cli("batch", "verify", spec.output_path(), "--json", timeout=120)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout + verify.stderr


def _vllm_processes(pid: int) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.name().startswith("VLLM")
                or "VLLM::" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.timeout(420)
def test_lost_engine_node_and_writer_finish_on_a_replacement_with_every_id_once(driver, tiny_model, tmp_path,
                                                                                  capsys):
    import ray

    from runtime.batch import run_batch
    from runtime.batch.runner import WRITER_NAME

    cluster = driver
    n = 16 * PER
    spec = _spec(tmp_path, tiny_model, "mn-loss", n, empty_every=10, sampling={"max_tokens": 16, "ignore_eos": True})
    out = Path(spec.output_path())
    engine_node = next(w for w in cluster.workers if w.spec.labels[POOL] == "engine")
    ended: dict = {}
    looks: list = []

    def job():
        try:
            ended["result"] = run_batch(spec, address=cluster.address)
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            ended["error"] = e
        ended["t"] = time.monotonic()

    t_start = time.monotonic()
    thread = threading.Thread(target=job, daemon=True)
    thread.start()

    def writer():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(WRITER_NAME)]
        return ray.get_actor(names[0]) if names else None

    def ready():
        """At least one shard committed and one partly in the writer's memory."""
        if "t" in ended:
            raise AssertionError(f"the run ended before the fault: {ended}; the writer's state: {looks[-20:]}")
        w = writer()
        if w is None or not (out / "_commits").exists() or not list((out / "_commits").glob("*.json")):
            return False
        held = {i: m for i, m in ray.get(w.pending.remote(), timeout=10).items() if m < PER}
        looks.append(held)
        return any(0 < m < PER for m in held.values())

    cluster.wait_for(ready, "a committed shard and one in progress", timeout_s=240, interval_s=0.1)
    in_memory = sorted(i for i, m in ray.get(writer().pending.remote()).items() if 0 < m < PER)
    live = [a for a in ray._private.state.actors().values() if a["State"] != "DEAD" and a["Pid"]]
    engines = [a for a in live if _vllm_processes(a["Pid"])]  # the actor hosting the vLLM engine
    assert [a["Address"]["NodeID"] for a in engines] == [engine_node.node_id], engines
    writer_pid = next(a["Pid"] for a in live if a["ActorClassName"] == "ShardWriter")
    vllm = _vllm_processes(engines[0]["Pid"])

    t_kill, wall_kill = time.monotonic(), time.time()
    os.kill(writer_pid, signal.SIGKILL)
    # The writer may have committed more between the look above and its death: those are done too.
    before = sh.read_commits(str(out))
    in_memory = [i for i in in_memory if i not in before]
    cluster.kill_node(engine_node)
    dead_s = time.monotonic() - t_kill
    cluster.wait_for(lambda: not _alive(vllm), "the removed node's vLLM processes to exit", timeout_s=30)
    vllm_gone_s = time.monotonic() - t_kill
    replacement = cluster.add_node(ENGINE_NODE)
    added_s = time.monotonic() - t_kill
    with Placement() as seen:
        thread.join(timeout=330)
    assert "t" in ended, "the run did not end"
    if "error" in ended:
        raise ended["error"]
    result = ended["result"]

    after = sh.read_commits(str(out))
    # Every id exactly once, read from every output file (not only through verify).
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == n and sorted(ids) == sorted(f"mn-loss-{i}" for i in range(n))
    assert result.ok and result.rows_out + result.rows_error == n and result.rows_error == n // 10, result.problems
    # Committed before the fault: not redone (the commit records are the very same).
    assert {i: after[i] for i in before} == before
    assert len(after) == n // PER and {c.run_id for c in after.values()} == {result.run_id}
    # The shards the old writer held in memory ran again in the finishing pass, and only those
    # not committed before the fault.
    assert set(in_memory) <= set(result.rerun_shards) and not set(result.rerun_shards) & set(before)
    # No vLLM process outlived the removed node; the engine ran again on the replacement.
    assert not _alive(vllm)
    assert replacement.node_id in seen.seen.get("engine", set()), seen.seen
    assert engine_node.node_id not in cluster.alive_node_ids()
    first_after = min(c.committed_at for i, c in after.items() if i not in before)
    lost = len(result.rerun_shards)
    with capsys.disabled():
        print(f"\n[multinode batch] engine node removed + writer SIGKILLed with {len(before)}/{n // PER} shards "
              f"committed (shard(s) {in_memory} in the writer's memory); node declared dead in {dead_s:.1f} s; "
              f"its {len(vllm)} vLLM processes gone {vllm_gone_s:.1f} s after the kill (0 left); replacement "
              f"added at +{added_s:.1f} s; first commit after the fault at "
              f"+{first_after - wall_kill:.1f} s; run ended "
              f"+{ended['t'] - t_kill:.1f} s after the fault ({ended['t'] - t_start:.1f} s in all); shards redone "
              f"in the finishing pass: {result.rerun_shards} ({lost * PER} rows); committed shards redone: 0")
