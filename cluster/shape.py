"""The Ray cluster a spec needs on Kubernetes: a head that runs no workload, a CPU worker group
and (when the spec asks for GPUs) a GPU worker group with tolerations and an accelerator selector.

>>> from cluster.shape import ray_cluster_spec
>>> ray_cluster_spec(spec, pod_extras)["workerGroupSpecs"][0]["groupName"]     # doctest: +SKIP
'gpu-workers'

Replica counts follow the sizing policy the spec class declares (``spec.shape.sizing``): a
training gang is fixed at ``num_workers`` pods so its placement group fits; batch is elastic from
zero; a served model follows its Serve autoscaling range; inference shapes scale between min and
max with KubeRay's in-tree autoscaler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from runtime.specs.common import pod_image

RAY_VERSION = "2.60.0"
GPU_RESOURCE = "nvidia.com/gpu"
HEAD_PORTS = [("gcs", 6379), ("dashboard", 8265), ("client", 10001), ("metrics", 8080)]


@dataclass(frozen=True)
class Replicas:
    replicas: int
    min: int
    max: int


@dataclass
class PodExtras:
    """What every Ray pod of a run gets beyond the container: volumes, mounts, init containers."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    head_init: list[dict[str, Any]] = field(default_factory=list)
    worker_init: list[dict[str, Any]] = field(default_factory=list)
    head_volume_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    serve_port: int | None = None


def _sized(spec) -> Replicas:
    """Worker pods by the spec's declared sizing policy (see ``runtime.specs.shape.Sizing``)."""
    n = spec.resources.num_workers
    policy = spec.shape.sizing
    if policy == "gang":
        return Replicas(n, n, n)
    if policy == "elastic":
        return Replicas(n, 0, n)
    if policy == "always-on":
        return Replicas(n, 1, n)
    # serve: engine replicas come from the Serve autoscaling range; each needs tensor_parallel_size GPUs.
    per_engine = max(
        1, math.ceil(spec.tensor_parallel_size / max(1.0, spec.resources.gpus_per_worker))
    )
    lo = spec.autoscaling.floor(spec.slo)
    return Replicas(lo * per_engine, lo * per_engine, max(spec.autoscaling.max_replicas, lo, 1) * per_engine)


def replicas_for(spec) -> Replicas:
    r = _sized(spec)
    k = spec.kubernetes
    lo = k.min_replicas if k.min_replicas is not None else r.min
    hi = k.max_replicas if k.max_replicas is not None else max(r.max, lo)
    return Replicas(min(max(r.replicas, lo), hi) if hi >= lo else r.replicas, lo, hi)


def quantity_cpu(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(round(cpus * 1000))}m"


def quantity_memory(gb: float) -> str:
    return f"{int(gb)}Gi" if float(gb).is_integer() else f"{int(round(gb * 1024))}Mi"


def _container(
    name: str,
    spec,
    cpus: float,
    memory_gb: float | None,
    gpus: int,
    extras: PodExtras,
    ports: list[tuple[str, int]],
) -> dict[str, Any]:
    k = spec.kubernetes
    limits: dict[str, str] = {"cpu": quantity_cpu(cpus)}
    if memory_gb:
        limits["memory"] = quantity_memory(memory_gb)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    c: dict[str, Any] = {
        "name": name,
        "image": pod_image(spec),
        "imagePullPolicy": k.image_pull_policy,
        "resources": {"limits": dict(limits), "requests": dict(limits)},
    }
    if ports:
        c["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports]
    if extras.env:
        c["env"] = list(extras.env)
    if k.env_secret:
        c["envFrom"] = [{"secretRef": {"name": k.env_secret}}]
    if extras.mounts:
        c["volumeMounts"] = list(extras.mounts)
    if k.container_security_context:
        c["securityContext"] = dict(k.container_security_context)
    return c


def _pod_spec(
    spec, container: dict[str, Any], extras: PodExtras, *, head: bool, gpu: bool
) -> dict[str, Any]:
    k = spec.kubernetes
    pod: dict[str, Any] = {"containers": [container]}
    inits = extras.head_init if head else extras.worker_init
    if inits:
        pod["initContainers"] = list(inits)
    if extras.volumes:
        pod["volumes"] = [
            extras.head_volume_overrides.get(v["name"], v) if head else v for v in extras.volumes
        ]
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.pod_security_context:
        pod["securityContext"] = dict(k.pod_security_context)
    if spec.priority:
        pod["priorityClassName"] = spec.priority
    if gpu:
        # GPU nodes carry this taint so that CPU pods stay off them.
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        if spec.resources.accelerator_type:
            pod["nodeSelector"] = {k.accelerator_label: spec.resources.accelerator_type}
    return pod


def ray_cluster_spec(spec, extras: PodExtras, labels: dict[str, str]) -> dict[str, Any]:
    """``rayClusterSpec`` (RayJob), ``rayClusterConfig`` (RayService) or a RayCluster's ``spec``."""
    k = spec.kubernetes
    res = spec.resources
    ports = list(HEAD_PORTS) + ([("serve", extras.serve_port)] if extras.serve_port else [])
    head = _container("ray-head", spec, k.head_cpus, k.head_memory_gb, 0, extras, ports)
    head_pod = {
        "metadata": {"labels": dict(labels)},
        "spec": _pod_spec(spec, head, extras, head=True, gpu=False),
    }
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": k.autoscaling,
        "headGroupSpec": {
            # The head schedules no tasks or actors: a busy head slows every task and the GCS.
            "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
            "template": head_pod,
        },
    }
    cluster["authOptions"] = auth_options(spec)
    if k.autoscaling:
        cluster["autoscalerOptions"] = {
            "version": "v2",
            "idleTimeoutSeconds": k.idle_timeout_seconds,
            "upscalingMode": "Default",
        }
        if k.container_security_context:  # the autoscaler sidecar KubeRay adds to the head pod
            cluster["autoscalerOptions"]["securityContext"] = dict(k.container_security_context)
    r = replicas_for(spec)
    groups = []
    if res.uses_gpu:
        gpus = max(1, math.ceil(res.gpus_per_worker))
        c = _container(
            "ray-worker", spec, res.cpus_per_worker, res.memory_gb_per_worker, gpus, extras, []
        )
        groups.append(_group("gpu-workers", r, spec, c, extras, gpu=True, labels=labels))
        cpu_r = Replicas(0, 0, k.cpu_group_max_replicas)
        c = _container(
            "ray-worker",
            spec,
            max(1.0, res.cpus_per_worker),
            res.memory_gb_per_worker,
            0,
            extras,
            [],
        )
        groups.append(_group("cpu-workers", cpu_r, spec, c, extras, gpu=False, labels=labels))
    else:
        c = _container(
            "ray-worker", spec, res.cpus_per_worker, res.memory_gb_per_worker, 0, extras, []
        )
        groups.append(_group("cpu-workers", r, spec, c, extras, gpu=False, labels=labels))
    cluster["workerGroupSpecs"] = groups
    return cluster


def auth_options(spec) -> dict[str, Any]:
    """KubeRay's ``authOptions`` for ``kubernetes.auth``.

    With ``mode: token`` (and no ``secretName``) the operator generates a random token into a Secret
    named after the RayCluster (data key ``auth_token``) and gives it to every Ray container, its
    autoscaler and a RayJob's submitter as ``RAY_AUTH_TOKEN``; the dashboard and Jobs API then
    refuse requests without it. ``none`` renders ``mode: disabled`` explicitly, so that the choice
    is visible in the manifest and does not flip with Ray's default.
    """
    return {"mode": "token" if spec.kubernetes.auth == "token" else "disabled"}


def _group(
    name: str, r: Replicas, spec, container, extras: PodExtras, *, gpu: bool, labels: dict[str, str]
) -> dict[str, Any]:
    group: dict[str, Any] = {
        "groupName": name,
        "replicas": r.replicas,
        "minReplicas": r.min,
        "maxReplicas": r.max,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": _pod_spec(spec, container, extras, head=False, gpu=gpu),
        },
    }
    if spec.kubernetes.autoscaling:
        group["idleTimeoutSeconds"] = spec.kubernetes.idle_timeout_seconds
    return group


def queue_labels(spec) -> dict[str, str]:
    """Labels that hand the object to the configured batch queue (Kueue, Volcano or YuniKorn)."""
    q = spec.queue
    if q is None:
        return {}
    if q.system == "kueue":
        labels = {"kueue.x-k8s.io/queue-name": q.name}
        if spec.priority:
            labels["kueue.x-k8s.io/priority-class"] = spec.priority
        return labels
    if q.system == "volcano":
        labels = {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": q.name}
        if spec.priority:
            labels["ray.io/priority-class-name"] = spec.priority
        return labels
    return {  # yunikorn: gang-schedule the whole cluster as one application in the queue
        "ray.io/scheduler-name": "yunikorn",
        "ray.io/gang-scheduling-enabled": "true",
        "yunikorn.apache.org/app-id": spec.name,
        "yunikorn.apache.org/queue": q.name,
    }
