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
import sys
from dataclasses import dataclass
from typing import Any

from cluster.storage import pod_env, pod_storage_root
from cluster.storage import volume as storage_volume
from runtime.models import WEIGHTS_MARKER as MARKER
from runtime.registry import existing_tracking_uri, pinned_ref
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
    alias_ref: str | None = None  # the spec's models:/NAME@ALIAS when ``ref`` is the version it named

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
    pinned = pin_registry_alias(ref, spec.storage.root)
    return WeightsPlan(
        pinned,
        model_key(pinned),
        field,
        w.claim_name,
        w.mount_path,
        w.stage,
        alias_ref=ref if pinned != ref else None,
    )


def pin_registry_alias(ref: str, storage_root: str) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/VERSION`` when the registry can be asked now.

    The cache folder is keyed on what this returns, so a promotion (a new champion) gives a new
    folder and a new staging Job instead of the frozen copy of the old champion. Without a
    registry here (no ``$MLFLOW_TRACKING_URI`` and no embedded one) the reference stays as it is
    and a warning says that promotions will not reach runs rendered like this.
    """
    if not ref.startswith("models:/") or "@" not in ref:
        return ref
    why = None
    if existing_tracking_uri(storage_root) is None:
        why = "no registry reachable from here (set MLFLOW_TRACKING_URI to the run's registry)"
    else:
        try:
            return pinned_ref(ref, storage_root)
        except Exception as e:  # noqa: BLE001 -- unreachable server, missing alias: render still works
            why = str(e).splitlines()[0]
    print(
        f"[raylane] warning: {ref} not resolved at render time: {why}; its weight cache is keyed on "
        "the alias, so a later promotion will not reach this run until it is rendered with the "
        "registry reachable",
        file=sys.stderr,
        flush=True,
    )
    return ref


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


def stage_job_name(plan: WeightsPlan) -> str:
    return f"stage-{plan.key}"[:63].rstrip("-")


def wait_script(plan: WeightsPlan, timeout_s: int) -> str:
    """The wait step: poll for the marker, give up after ``timeout_s`` with what to check and do."""
    marker = f"{plan.local_path}/{MARKER}"
    who = (
        f"the staging Job {stage_job_name(plan)} failed or is still copying "
        f"(kubectl logs job/{stage_job_name(plan)})"
        if plan.stage == "job"
        else "the head pod's stage-weights init container failed or is still copying "
        "(kubectl logs <head pod> -c stage-weights)"
    )
    what = f"{plan.alias_ref} ({plan.ref})" if plan.alias_ref else plan.ref
    message = (
        f"raylane: the weights of {what} are not staged at {plan.local_path} after {timeout_s} s: "
        f"{who}; fix the cause, then run raylane apply again (it recreates a failed staging Job)"
    )
    message = re.sub(r'([\\"$`])', r"\\\1", message)  # inert inside the double quotes below
    # date +%s works in busybox and GNU sh images alike; a deadline, not a counter, survives slow polls.
    return (
        f"deadline=$(( $(date +%s) + {timeout_s} )); "
        f"until [ -f {marker} ]; do "
        f'if [ "$(date +%s)" -ge "$deadline" ]; then echo "{message}" >&2; exit 1; fi; '
        f"echo waiting for {marker}; sleep 5; done"
    )


def wait_container(spec, plan: WeightsPlan) -> dict[str, Any]:
    return {
        "name": "wait-for-weights",
        "image": pod_image(spec),
        "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": ["sh", "-c", wait_script(plan, spec.kubernetes.weights.wait_timeout_s)],
        "volumeMounts": [{"name": VOLUME, "mountPath": plan.mount_path, "readOnly": True}],
        **_security(spec),
    }


def _security(spec) -> dict[str, Any]:
    sc = spec.kubernetes.container_security_context
    return {"securityContext": dict(sc)} if sc else {}


def stage_container(spec, plan: WeightsPlan) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "stage-weights",
        "image": pod_image(spec),
        "imagePullPolicy": spec.kubernetes.image_pull_policy,
        "command": stage_command(plan, pod_storage_root(spec)),
        "env": pod_env(spec),  # a models:/ reference is read from the run's registry
        "volumeMounts": [{"name": VOLUME, "mountPath": plan.mount_path}],
        **_security(spec),
    }
    if (shared := storage_volume(spec)) is not None:
        c["volumeMounts"].append(shared[1])
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
    if (shared := storage_volume(spec)) is not None:
        pod["volumes"].append(shared[0])
    if spec.kubernetes.service_account:
        pod["serviceAccountName"] = spec.kubernetes.service_account
    if spec.kubernetes.pod_security_context:
        pod["securityContext"] = dict(spec.kubernetes.pod_security_context)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        # Named by the model, not the run: every run of the same model shares one staging Job.
        "metadata": {
            "name": stage_job_name(plan),
            "namespace": namespace,
            "labels": {**labels, "raylane.dev/model-key": plan.key},
        },
        "spec": {
            "backoffLimit": 3,
            "template": {"metadata": {"labels": {"raylane.dev/model-key": plan.key}}, "spec": pod},
        },
    }
