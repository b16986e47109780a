"""Ray Train on a multi-node Ray cluster (``runtime.testing``): a head with 0 CPUs and two worker
nodes, each with 1 logical CPU, 1 logical GPU and the accelerator label L4.

A 2-worker STRICT_SPREAD gang runs one worker per node. The uninterrupted run is the reference;
the second run is ``python -m jobs.train`` in its own process (as ``ray job submit`` runs it, and
so the test's thread is free to change the cluster): rank 0's node is removed abruptly after a
checkpoint is committed and a replacement joins: Ray Train restarts the gang on the survivor and the new node from the last
committed checkpoint, the run ends at the exact step, and the loss curve equals the reference.
A gang asking for more logical GPUs (or nodes, or another accelerator) than the cluster has
fails within the placement timeout, naming what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from runtime.errors import PlacementTimeout
from runtime.specs import parse_spec
from runtime.testing import NodeSpec
from tests.conftest import EXAMPLES

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

STEPS, EVERY = 30, 5
HOOK = "tests.train.train_hooks:paced_with_progress"  # paced, and it says which step each rank is on
WORKER_NODE = NodeSpec(cpus=1, gpus=1, accelerator_type="L4")


@pytest.fixture(scope="module")
def local_cluster_nodes():
    return [WORKER_NODE, WORKER_NODE]


def _spec(root: Path, name: str, **resources) -> dict:
    d = yaml.safe_load((EXAMPLES / "train.yaml").read_text())
    d.update(name=name, storage={"root": str(root)}, registry={"enabled": False})
    d["data"]["path"] = str(EXAMPLES / "data" / "train.jsonl")
    d["train"].update(steps=STEPS, checkpoint_every_n_steps=EVERY, checkpoints_to_keep=2, max_failures=2,
                      step_fn=HOOK)
    # Half a logical CPU per worker: the end-of-run evaluation task fits beside the gang.
    d["resources"] = {"num_workers": 2, "cpus_per_worker": 0.5, **resources}
    d["placement"] = {"strategy": "STRICT_SPREAD", "timeout_s": 60}
    return d


@pytest.fixture(scope="module")
def driver(local_cluster):
    """One driver connection for the module (as a notebook or a job driver holds one): each run's
    ray_session attaches to it instead of connecting and disconnecting."""
    from runtime.ray_env import init_ray, shutdown_ray

    init_ray(local_cluster.address)
    yield local_cluster
    shutdown_ray()


def _run(d: dict, cluster):
    from runtime.training import run_training

    return run_training(parse_spec(d), address=cluster.address)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _ranks(run_dir: Path, folder: str) -> list[dict]:
    return [r for r in (_read(run_dir / folder / f"rank-{i}.json") for i in range(2)) if r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, driver, local_cluster):
    root = tmp_path_factory.mktemp("mn-ref")
    r = _run(_spec(root, "ref"), local_cluster)
    return r, _ranks(root / "runs" / "ref", "workers")


@pytest.mark.timeout(240)
def test_strict_spread_gang_runs_one_worker_per_node(reference, local_cluster):
    r, ranks = reference
    assert r.final_step == STEPS and len(r.loss_history) == STEPS and r.restarts == 0
    assert np.mean(r.loss_history[-5:]) < np.mean(r.loss_history[:5])
    nodes = {w["node_id"] for w in ranks}
    assert len(ranks) == 2 and nodes == {w.node_id for w in local_cluster.workers}, (ranks, local_cluster.workers)


def _job(spec: dict, cluster, folder: Path) -> subprocess.Popen:
    """The run as ``ray job submit`` runs it: ``python -m jobs.train`` in its own process, a driver
    attached to the cluster. The test's own thread stays free to remove and add nodes meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "jobs.train", "--spec", str(folder / "spec.yaml")], cwd=REPO,
                            env=env, stdout=open(folder / "stdout", "w"), stderr=open(folder / "stderr", "w"))


def _job_result(folder: Path) -> dict:
    """The result JSON jobs.train prints last (worker log lines may come before it)."""
    out = (folder / "stdout").read_text()
    for i in reversed([m.start() for m in re.finditer(r"^\{$", out, re.M)]):
        with contextlib.suppress(json.JSONDecodeError):
            r, _ = json.JSONDecoder().raw_decode(out[i:])
            if isinstance(r, dict) and "final_step" in r:
                return r
    raise AssertionError(f"no result JSON in jobs.train's output:\n{out[-3000:]}\n{(folder / 'stderr').read_text()[-3000:]}")


def _committed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has committed (its checkpoint manager's snapshot)."""
    snap = _read(run_dir / "checkpoint_manager_snapshot.json")
    return sorted({int(s) for s in re.findall(r"step-(\d{6})", json.dumps(snap))}) if snap else []


@pytest.mark.timeout(240)
def test_lost_node_restarts_the_gang_from_the_last_checkpoint(tmp_path, reference, local_cluster, capsys):
    ref, _ = reference
    run_dir = tmp_path / "runs" / "lost"
    t_start = time.time()
    job = _job(_spec(tmp_path, "lost"), local_cluster, tmp_path / "job")
    try:
        # Wait for a committed checkpoint and rank 0 a few steps past it, then lose rank 0's node.
        def ready():
            if job.poll() is not None:
                raise AssertionError(f"jobs.train exited {job.returncode} before the node was removed: "
                                     f"{(tmp_path / 'job' / 'stderr').read_text()[-3000:]}")
            p = _read(run_dir / "progress" / "rank-0.json")
            return bool(p and _committed_steps(run_dir) and p["step"] >= 12)

        local_cluster.wait_for(ready, "a committed checkpoint and rank 0 at step 12", timeout_s=120, interval_s=0.05)
        p = _read(run_dir / "progress" / "rank-0.json")
        assert p["step"] < STEPS - 5, f"the run was too far along to lose a node mid-run: {p}"
        committed = _committed_steps(run_dir)
        running = max(q["step"] for q in _ranks(run_dir, "progress"))
        t_kill = time.time()
        local_cluster.kill_node(p["node_id"])
        dead_s = time.time() - t_kill
        replacement = local_cluster.add_node(WORKER_NODE).node_id
        t_added = time.time()
        rc = job.wait(timeout=150)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    r = _job_result(tmp_path / "job")
    assert rc == 0, r

    assert r["restarts"] == 1, r
    c = r["resumed_from_step"]
    # Resumed from a committed checkpoint at or after the last one committed when the node went
    # (one still uploading then may have been committed after), never from a step not yet reached.
    assert c is not None and c % EVERY == 0 and committed[-1] <= c < running, (c, committed, running)
    assert r["final_step"] == STEPS and len(r["loss_history"]) == STEPS
    # Same weights, optimiser, RNG and data position after the restart: the same curve step for step
    # after the restored checkpoint. The tolerance is far below the step-to-step change of the
    # loss, so a batch from the wrong data position fails it.
    after, ref_after = np.array(r["loss_history"][c:]), np.array(ref.loss_history[c:])
    assert np.abs(np.diff(ref_after)).min() > 1e-3 * ref_after.max(), "the curve is too flat to tell batches apart"
    np.testing.assert_allclose(after, ref_after, rtol=1e-3)
    np.testing.assert_allclose(r["loss_history"], ref.loss_history, rtol=1e-3)
    # The restarted gang is spread one per node again: the survivor and the replacement.
    survivor = {w.node_id for w in local_cluster.workers} - {replacement}
    assert {w["node_id"] for w in _ranks(run_dir, "workers")} == survivor | {replacement}
    assert p["node_id"] not in {w.node_id for w in local_cluster.workers}
    with capsys.disabled():
        print(f"\n[multinode] rank 0's node removed during step {running} (checkpoints committed then: "
              f"{committed}; declared dead in {dead_s:.1f} s); resumed from step {c}: {running - 1 - c} completed "
              f"step(s) redone ({(running - 1 - c) / EVERY:.1f} checkpoint intervals); replacement joined to run "
              f"end {time.time() - t_added:.1f} s; test {time.time() - t_start:.1f} s (reference run {ref.seconds:.1f} s)")


@pytest.mark.timeout(120)
def test_gang_larger_than_the_cluster_fails_fast_naming_what_is_missing(tmp_path, driver, local_cluster):
    from runtime.placement import check_gang
    from runtime.specs.common import Resources

    # What the cluster has fits: one logical GPU on each L4 node.
    check_gang(Resources(num_workers=2, cpus_per_worker=0.5, gpus_per_worker=1, accelerator_type="L4"),
               "STRICT_SPREAD", timeout_s=30)
    t0 = time.time()
    with pytest.raises(PlacementTimeout) as e:
        _run(dict(_spec(tmp_path, "too-big", num_workers=3, gpus_per_worker=1),
                  placement={"strategy": "STRICT_SPREAD", "timeout_s": 3}), local_cluster)
    assert time.time() - t0 < 60
    msg = str(e.value)
    assert "the gang needs 3 GPU in total, the cluster has 2 GPU (missing 1 GPU)" in msg, msg
    assert "STRICT_SPREAD needs 3 nodes" in msg and "the cluster has 2 (missing 1 node(s))" in msg, msg
    with pytest.raises(PlacementTimeout, match=r"no node has accelerator type H100 .*; the cluster's nodes have: L4"):
        check_gang(Resources(num_workers=2, cpus_per_worker=0.5, gpus_per_worker=1, accelerator_type="H100"),
                   "STRICT_SPREAD", timeout_s=2)
