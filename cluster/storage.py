"""Storage that outlives the cluster: where a rendered run keeps checkpoints, outputs, the model
registry and agent sessions, and the check that names what would be lost with the pods.

A local ``storage.root`` (``~/.raylane`` by default) is right for ``raylane run`` and wrong in a
pod: each pod would write its own disk, and the files go when KubeRay deletes the cluster. On
Kubernetes a run keeps its storage on an ``s3://`` root or on ``kubernetes.storage``, a
ReadWriteMany volume mounted in every Ray pod whose mount path becomes the cluster's root (the
spec's local root stays the local run's). ``raylane render`` prints the problems as warnings;
``raylane apply`` refuses them unless ``kubernetes.ephemeral_storage: true``.

>>> from runtime.specs import parse_spec
>>> spec = parse_spec({"kind": "BatchInference", "name": "b", "model": "tiny",
...                    "input": {"path": "s3://in/rows.jsonl", "prompt_column": "p"}, "output": {}})
>>> [p.path for p in storage_problems(spec)]
['storage.root']
"""

from __future__ import annotations

from typing import Any

from runtime.errors import SpecError, SpecProblem
from runtime.registry import REF_RE
from runtime.specs import dump_spec

VOLUME = "raylane-storage"
STORAGE_ROOT_ENV = "RAYLANE_STORAGE_ROOT"
REGISTRY_ROOT_ENV = "RAYLANE_REGISTRY_ROOT"


def pod_storage_root(spec) -> str:
    """The storage root as the pods see it: an ``s3://`` root as is, else the shared volume's mount
    path when there is one, else the spec's own root (a path inside each pod)."""
    if spec.storage.is_remote:
        return spec.storage.root
    shared = spec.kubernetes.storage
    return shared.mount_path if shared else spec.storage.root


def for_cluster(spec):
    """A copy of ``spec`` whose storage root is the pods' (what the job or Serve app reads); a
    FineTune's ``release.serve`` app gets its own pods' root too."""
    release = getattr(spec, "release", None)
    if release is not None:
        serve = for_cluster(release.serve)
        if serve is not release.serve:
            spec = spec.model_copy(update={"release": release.model_copy(update={"serve": serve})})
    root = pod_storage_root(spec)
    if root == spec.storage.root:
        return spec
    return spec.model_copy(update={"storage": spec.storage.model_copy(update={"root": root})})


def pod_env(spec) -> list[dict[str, str]]:
    """Environment of every Ray pod: the storage root, the registry's home and tracking server."""
    k = spec.kubernetes
    env = [{"name": STORAGE_ROOT_ENV, "value": pod_storage_root(spec)}]
    if k.storage and spec.storage.is_remote:
        # The embedded registry of an s3:// root lives on local disk: put it on the shared volume.
        env.append({"name": REGISTRY_ROOT_ENV, "value": k.storage.mount_path})
    if k.mlflow_tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": k.mlflow_tracking_uri})
    return env


def volume(spec) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The shared volume and its read-write mount, when the spec has one."""
    shared = spec.kubernetes.storage
    if shared is None:
        return None
    return (
        {"name": VOLUME, "persistentVolumeClaim": {"claimName": shared.claim_name}},
        {"name": VOLUME, "mountPath": shared.mount_path},
    )


def pvc_manifest(spec, namespace: str, labels: dict[str, str]) -> dict[str, Any] | None:
    """The shared volume's PVC when the spec asks raylane to create it (``size_gb``)."""
    shared = spec.kubernetes.storage
    if shared is None or shared.size_gb is None:
        return None
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": shared.claim_name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{shared.size_gb}Gi"}}},
    }
    if shared.storage_class:
        pvc["spec"]["storageClassName"] = shared.storage_class
    return pvc


def storage_problems(spec) -> list[SpecProblem]:
    """What a rendered ``spec`` would keep inside its pods, each naming the field and the fix. A
    ``models:/`` reference counts even when its weights are staged: the staging Job reads it."""
    k = spec.kubernetes
    problems: list[str] = []
    durable = spec.shape.kuberay == "RayJob"  # training, fine-tuning and batch write their results
    shared_root = spec.storage.is_remote or k.storage is not None
    if durable and not shared_root:
        problems.append(SpecProblem(
            "storage.root", f"{spec.storage.root!r} is a path inside each pod: checkpoints, outputs and the "
            "registry would be lost with the cluster, and each node would see its own files; set storage.root "
            "to an s3:// URI or mount a ReadWriteMany volume with kubernetes.storage: {claim_name: PVC} "
            "(the cluster's root becomes its mount_path)"
        ))
    sessions = getattr(spec, "sessions", None)
    if sessions is not None and sessions.backend == "sqlite":
        url = sessions.url
        on_shared = k.storage is not None and (url is None or url.startswith(k.storage.mount_path.rstrip("/") + "/"))
        if not on_shared:
            where = f"{url!r}" if url else "under the storage root"
            problems.append(SpecProblem(
                "sessions", f"the SQLite session store ({where}) would sit inside one pod: sessions are lost "
                "with it and replicas on other nodes cannot reach them; use sessions: {backend: redis, url: "
                "redis://HOST:6379/0}, or kubernetes.storage with the SQLite file on it"
            ))
    rollout = getattr(spec, "rollout", None)
    if rollout is not None and not shared_root:
        problems.append(SpecProblem(
            "rollout", f"storage.root {spec.storage.root!r} is a path inside each pod, and a rollout's state, "
            "the replicas' per-arm counts and its controller meet only there: each pod would see its own; set "
            "storage.root to an s3:// URI or mount kubernetes.storage (a ReadWriteMany volume) in every pod"
        ))
    release = getattr(spec, "release", None)
    if release is not None and pod_storage_root(release.serve) != pod_storage_root(spec):
        problems.append(SpecProblem(
            "release.serve", f"app {release.serve.name!r} sees its storage root as "
            f"{pod_storage_root(release.serve)!r} in its pods, this run as {pod_storage_root(spec)!r}: the "
            "rollout this run starts would not reach the app; give both the same s3:// root or mount the same "
            "kubernetes.storage volume at the same mount_path"
        ))
    if _uses_registry(spec) and not k.mlflow_tracking_uri and k.storage is None:
        problems.append(SpecProblem(
            "kubernetes.mlflow_tracking_uri", "the run uses the MLflow registry, which would be a SQLite file "
            "inside the pod (empty, and lost with it); set kubernetes.mlflow_tracking_uri to your tracking "
            "server, or mount kubernetes.storage so the embedded registry lives on it"
        ))
    return problems


def check_storage(spec) -> None:
    """Refuse a spec whose storage would die with its pods (``raylane apply``), unless it says
    ``kubernetes.ephemeral_storage: true``."""
    if spec.kubernetes.ephemeral_storage:
        return
    problems = storage_problems(spec)
    if problems:
        raise SpecError(
            f"{spec.kind} {spec.name!r} on Kubernetes", problems,
            hint="fix the fields above (README: Kubernetes, storage that outlives the cluster), or set "
            "kubernetes.ephemeral_storage: true to apply a throwaway run whose files are lost with the cluster",
        )


def _uses_registry(spec) -> bool:
    registry = getattr(spec, "registry", None)
    if registry is not None and registry.enabled:
        return True
    return any(REF_RE.match(v) for v in _strings(dump_spec(spec)))


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
