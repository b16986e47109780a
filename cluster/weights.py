"""The model weight cache: weights staged once onto a shared PVC, mounted read-only into Ray pods.

>>> from cluster.weights import weights_plan
>>> plan = weights_plan(spec)           # None when the shape has no model or the cache is off  # doctest: +SKIP
>>> plan.local_path                      # '/mnt/weights/tiny-3f2a9c1d'                           # doctest: +SKIP

Each model reference gets its own folder on the PVC, named from the reference, and a marker file
written last: staging is idempotent (a second run finds the marker and does nothing) and pods wait
for the marker instead of reading half-copied weights. Images never contain weights.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from runtime.models import WEIGHTS_MARKER as MARKER
from runtime.specs.common import pod_image

VOLUME = "raylane-weights"


@dataclass(frozen=True)
class WeightsPlan:
    ref: str  # the model reference in the spec
    key: str  # folder name on the PVC
    field: str  # spec field holding the reference
    claim: str
    mount_path: str
    stage: str  # "job" or "init-container"

    @property
    def local_path(self) -> str:
        return f"{self.mount_path.rstrip('/')}/{self.key}"


def model_key(ref: str) -> str:
    """A DNS-safe folder/Job name for a model reference (readable prefix + hash of the full ref)."""
    digest = hashlib.sha256(ref.encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9]+", "-", ref.lower()).strip("-")[:40].strip("-") or "model"
    return f"{stem}-{digest}"


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def weights_plan(spec) -> WeightsPlan | None:
    field = spec.shape.model_field  # where the spec class names its model; None = no model
    w = spec.kubernetes.weights
    if field is None or not w.enabled or spec.kubernetes.cluster_selector:
        return None
    ref = _get(spec, field)
    if not ref:
        return None  # e.g. an agent calling an external OpenAI-compatible URL
    return WeightsPlan(ref, model_key(ref), field, w.claim_name, w.mount_path, w.stage)


def with_local_model(spec, plan: WeightsPlan):
    """A copy of ``spec`` whose model reference points at the staged folder on the PVC."""
    parts = plan.field.split(".")
    update: dict[str, Any] = {parts[-1]: plan.local_path}
    for depth in range(len(parts) - 1, 0, -1):
        parent = _get(spec, ".".join(parts[:depth]))
        update = {parts[depth - 1]: parent.model_copy(update=update)}
    return spec.model_copy(update=update)


def stage_command(plan: WeightsPlan, storage_root: str) -> list[str]:
    return [
        "python",
        "-m",
        "jobs.stage_weights",
        "--model",
        plan.ref,
        "--dest",
        plan.local_path,
        "--storage-root",
        storage_root,
    ]


def wait_container(spec, plan: WeightsPlan) -> dict[str, Any]:
    marker = f"{plan.local_path}/{MARKER}"
    return {
        "name": "wait-for-weights",
        "image": pod_image(spec),
        "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": [
            "sh",
            "-c",
            f"until [ -f {marker} ]; do echo waiting for {marker}; sleep 5; done",
        ],
        "volumeMounts": [{"name": VOLUME, "mountPath": plan.mount_path, "readOnly": True}],
    }


def stage_container(spec, plan: WeightsPlan) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "stage-weights",
        "image": pod_image(spec),
        "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": stage_command(plan, spec.storage.root),
        "volumeMounts": [{"name": VOLUME, "mountPath": plan.mount_path}],
    }
    if spec.kubernetes.env_secret:  # hub tokens / object-store credentials for the download
        c["envFrom"] = [{"secretRef": {"name": spec.kubernetes.env_secret}}]
    return c


def pvc_manifest(spec, plan: WeightsPlan, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    w = spec.kubernetes.weights
    pvc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": plan.claim, "namespace": namespace, "labels": dict(labels)},
        # Written once by the stager, then read by many pods on many nodes.
        "spec": {
            "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
            "resources": {"requests": {"storage": f"{w.size_gb}Gi"}},
        },
    }
    if w.storage_class:
        pvc["spec"]["storageClassName"] = w.storage_class
    return pvc


def stage_job_manifest(
    spec, plan: WeightsPlan, namespace: str, labels: dict[str, str]
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [stage_container(spec, plan)],
        "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": plan.claim}}],
    }
    if spec.kubernetes.service_account:
        pod["serviceAccountName"] = spec.kubernetes.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        # Named by the model, not the run: every run of the same model shares one staging Job.
        "metadata": {
            "name": f"stage-{plan.key}"[:63].rstrip("-"),
            "namespace": namespace,
            "labels": {**labels, "raylane.dev/model-key": plan.key},
        },
        "spec": {
            "backoffLimit": 3,
            "template": {"metadata": {"labels": {"raylane.dev/model-key": plan.key}}, "spec": pod},
        },
    }
