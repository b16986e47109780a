"""Ray Train on a multi-node Ray cluster (``runtime.testing``): a head with 0 CPUs and two worker
nodes, each with 1 logical CPU, 1 logical GPU and the accelerator label L4.

A 2-worker STRICT_SPREAD gang runs one worker per node to the exact step. A gang asking for more logical GPUs (or nodes, or another accelerator) than the cluster has
fails within the placement timeout, naming what is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from runtime.errors import PlacementTimeout
from runtime.specs import parse_spec
from runtime.testing import NodeSpec
from tests.conftest import EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

STEPS, EVERY = 30, 5
HOOK = "tests.train.train_hooks:paced_causal_lm"
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
