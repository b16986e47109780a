"""A multi-node Ray cluster on one machine, for raylane's tests and yours.

>>> from runtime.testing import LocalCluster, NodeSpec
>>> with LocalCluster([NodeSpec(cpus=1, gpus=1, accelerator_type="L4")] * 2) as cluster:  # doctest: +SKIP
...     run_training(spec, address=cluster.address)       # any raylane runner takes address=
...     cluster.kill_node(cluster.workers[0])             # a node lost abruptly (spot preemption)
...     cluster.add_node(NodeSpec(cpus=1))                # its replacement joins

Each node is a real raylet (``ray.cluster_utils.Cluster``, what Ray's own multi-node tests use)
with its own object store and worker processes; they share this machine's cores, so the resources
they declare are logical. A CPU machine can declare GPUs: Ray schedules logical GPUs by count, so
placement and "does the gang fit" are tested without one (a worker that then touches CUDA fails).

The head node declares 0 CPUs, as on KubeRay (``cluster.shape``): without that, a gang lands on
the head and losing a worker node proves nothing. The cluster is what ``runtime.ray_env`` starts
locally in every other respect: token authentication on (Ray 2.60's default for local clusters;
``RAY_AUTH_MODE`` overrides it), Serve's HAProxy enabled, HAProxy's stats and metrics listeners on
free ports (per node: every node runs its own HAProxy). Lost nodes are declared dead within a few
seconds instead of Ray's default of about 30 (``LocalCluster(system_config=...)`` changes it).

The driver of the test (the runner you call) connects to the head; the kit itself never calls
``ray.init``, so a runner's ``ray_session(address)`` opens and closes the connection as it would
against a real cluster. pytest fixtures: ``runtime.testing_pytest``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from runtime.ray_env import HAPROXY_PORT_ENV, free_port
from runtime.vllm_env import SERVE_CLUSTER_ENV

# A killed raylet stops answering at once; 5 missed checks 1 s apart declare it dead (Ray's default
# is 3 s apart after a 5 s delay, with 10 s timeouts: about 30 s before Ray Train or Serve react).
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 5000,
    "health_check_failure_threshold": 5,
}
ACCELERATOR_LABEL = "ray.io/accelerator-type"


@dataclass(frozen=True)
class NodeSpec:
    """One worker node's logical resources and labels."""

    cpus: int = 1  # logical CPUs; workers may reserve fractions of them
    gpus: int = 0  # logical GPUs: schedulable by count on a machine without any
    accelerator_type: str | None = None  # e.g. "L4": the resource and label Ray gives such a node
    resources: dict[str, float] = field(default_factory=dict)  # custom resources
    labels: dict[str, str] = field(default_factory=dict)  # node labels (label_selector targets)
    object_store_mb: int = 150
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the node's processes

    def node_args(self) -> dict[str, Any]:
        resources = dict(self.resources)
        labels = dict(self.labels)
        if self.accelerator_type:
            # What Ray sets on a node with a detected accelerator, so `accelerator_type=` and
            # raylane's gang bundles (`accelerator_type:<type>`) match it.
            resources[f"accelerator_type:{self.accelerator_type}"] = 1.0
            labels.setdefault(ACCELERATOR_LABEL, self.accelerator_type)
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "resources": resources, "labels": labels,
                "object_store_memory": self.object_store_mb * 2**20}


@dataclass(frozen=True)
class WorkerNode:
    """A worker node the kit started: its Ray node id and what it declared."""

    node_id: str
    spec: NodeSpec
    handle: Any  # ray._private.node.Node


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_handed_out: set[int] = set()


def _unused_port() -> int:
    """A free port no other node of this process's clusters got: HAProxy binds it only once Serve
    starts, so a port that is free now may already belong to another node."""
    while True:
        port = free_port("")
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _node_env(spec: NodeSpec | None) -> dict[str, str]:
    """The environment a node's raylet (and every worker it starts) inherits."""
    env = {k: v for k, v in SERVE_CLUSTER_ENV.items() if k not in os.environ}
    # Every node runs Serve's HAProxy; two on one machine cannot share its fixed listener ports.
    env.update({k: str(_unused_port()) for k in HAPROXY_PORT_ENV})
    env.update(spec.env if spec else {})
    return env


class LocalCluster:
    """A head (0 CPUs by default) plus worker nodes, all on this machine; a context manager."""

    def __init__(self, workers: Sequence[NodeSpec] = (NodeSpec(), NodeSpec()), *, head_cpus: int = 0,
                 head_object_store_mb: int = 256, system_config: dict[str, Any] | None = None):
        self._initial = list(workers)
        self._head_cpus = head_cpus
        self._head_object_store_mb = head_object_store_mb
        self._system_config = dict(FAST_FAILURE_DETECTION if system_config is None else system_config)
        self._cluster = None
        self._auth_env: dict[str, str | None] = {}
        self.workers: list[WorkerNode] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        from ray.cluster_utils import Cluster

        self._enable_token_auth()
        with _environ(_node_env(None)):
            self._cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": self._head_cpus, "num_gpus": 0,
                "object_store_memory": self._head_object_store_mb * 2**20,
                "_system_config": self._system_config,
            })
        for spec in self._initial:
            self.add_node(spec)
        return self

    def stop(self) -> None:
        """Stop every node (the head last) and every process they started."""
        if self._cluster is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # a runner that left its connection open
            self._cluster.shutdown()
            self._cluster = None
        self.workers = []
        for k, v in self._auth_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._auth_env = {}

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _enable_token_auth(self) -> None:
        """Token auth as on a ``ray.init()`` local cluster: on unless RAY_AUTH_MODE says otherwise,
        the token in ~/.ray/auth_token (created if missing); runners connect with it."""
        from ray._private.authentication.authentication_token_setup import (
            AUTH_MODE_ENV_VAR,
            enable_token_auth_by_default,
            ensure_token_if_auth_enabled,
        )

        self._auth_env = {AUTH_MODE_ENV_VAR: os.environ.get(AUTH_MODE_ENV_VAR)}
        enable_token_auth_by_default()
        ensure_token_if_auth_enabled(None, create_token_if_missing=True)

    # -- what tests use ------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The GCS address (``HOST:PORT``): what raylane runners' ``address=`` and ray.init take."""
        if self._cluster is None:
            raise RuntimeError("the cluster is not started (use it as a context manager)")
        return self._cluster.address

    def add_node(self, spec: NodeSpec = NodeSpec(), *, timeout_s: float = 60) -> WorkerNode:
        """Start a worker node and wait until the GCS lists it alive."""
        with _environ(_node_env(spec)):
            handle = self._cluster.add_node(wait=True, **spec.node_args())
        node = WorkerNode(handle.node_id, spec, handle)
        self.workers.append(node)
        self.wait_for(lambda: node.node_id in self.alive_node_ids(), f"node {node.node_id[:8]} alive", timeout_s)
        return node

    def kill_node(self, node: WorkerNode | str, *, timeout_s: float = 60) -> None:
        """Lose a node abruptly: SIGKILL its raylet and everything on it (no graceful shutdown, as
        a preempted VM or an OOM-killed pod), then wait until the GCS declares it dead."""
        node = self._worker(node)
        self._cluster.remove_node(node.handle, allow_graceful=False)
        self.workers.remove(node)
        self.wait_for(lambda: node.node_id not in self.alive_node_ids(), f"node {node.node_id[:8]} dead", timeout_s)

    def drain_node(self, node: WorkerNode | str, *, deadline_s: float = 30, reason: str = "preemption",
                   timeout_s: float = 120) -> None:
        """Drain a node gracefully, as the autoscaler and KubeRay do before removing a pod: Ray
        stops scheduling new work there, lets running tasks finish, and the node exits once idle
        (or is shut down gracefully when ``deadline_s`` has passed). ``reason``: "preemption"
        (always accepted) or "idle" (Ray refuses it while the node runs work)."""
        from ray._raylet import GcsClient
        from ray.core.generated import autoscaler_pb2

        node = self._worker(node)
        why = {"preemption": "DRAIN_NODE_REASON_PREEMPTION", "idle": "DRAIN_NODE_REASON_IDLE_TERMINATION"}[reason]
        deadline = time.time() + deadline_s
        accepted, message = GcsClient(address=self.address).drain_node(
            node.node_id, autoscaler_pb2.DrainNodeReason.Value(why), "drained by runtime.testing",
            int(deadline * 1000))
        if not accepted:
            raise RuntimeError(f"Ray refused to drain node {node.node_id[:8]}: {message}")
        # A draining raylet refuses new work and exits by itself once its work is done; past the
        # deadline it is shut down anyway (as KubeRay deletes the pod).
        with contextlib.suppress(TimeoutError):
            self.wait_for(lambda: node.node_id not in self.alive_node_ids(), "the drained node to exit",
                          max(0.0, deadline - time.time()))
        self._cluster.remove_node(node.handle, allow_graceful=True)
        self.workers.remove(node)
        self.wait_for(lambda: node.node_id not in self.alive_node_ids(), f"node {node.node_id[:8]} dead", timeout_s)

    def nodes(self) -> list[dict[str, Any]]:
        """The GCS node table (``ray.nodes()``'s entries) without connecting a driver."""
        return self._cluster.global_state.node_table()

    def alive_node_ids(self) -> set[str]:
        return {n["NodeID"] for n in self.nodes() if n["Alive"]}

    def node_state(self, node: WorkerNode | str) -> dict[str, Any]:
        node_id = node.node_id if isinstance(node, WorkerNode) else node
        return next(n for n in self.nodes() if n["NodeID"] == node_id)

    def worker(self, node_id: str) -> WorkerNode:
        """The worker node with this Ray node id (e.g. from ``ray.get_runtime_context().get_node_id()``)."""
        return self._worker(node_id)

    @staticmethod
    def wait_for(condition, what: str, timeout_s: float, interval_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(interval_s)

    def _worker(self, node: WorkerNode | str) -> WorkerNode:
        if isinstance(node, WorkerNode):
            if node not in self.workers:
                raise ValueError(f"node {node.node_id[:8]} is not a live worker node of this cluster")
            return node
        for w in self.workers:
            if w.node_id == node:
                return w
        known = ", ".join(w.node_id[:8] for w in self.workers) or "none"
        raise ValueError(f"no live worker node {node[:8]} in this cluster (worker nodes: {known}; the head "
                         "cannot be removed: the driver is connected to it)")
