"""Specs to KubeRay manifests: RayJob, RayCronJob, RayService or RayCluster, plus what they need
(the spec as a ConfigMap, the weight-cache PVC and its staging Job).

>>> from runtime.specs import load_spec
>>> from cluster.render import render
>>> docs = render(load_spec("examples/batch.yaml"))       # [ConfigMap, PVC, Job, RayJob]  # doctest: +SKIP
>>> docs[-1]["kind"]                                       # doctest: +SKIP
'RayJob'

The spec travels whole: it is mounted from a ConfigMap at /etc/raylane/spec.yaml and the entrypoint
is the same ``python -m jobs.<shape> --spec`` users run with ``ray job submit``; a RayService's
serveConfigV2 is exactly what ``build_serve_config(spec)`` gives ``serve deploy``. Every manifest is
checked (CRD schema, undeclared keys, KubeRay's own rules) before it is returned: a violation is a
``ManifestInvalid`` naming the field and the spec setting to change.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import yaml

from cluster import crds, rules
from cluster import storage as shared_storage
from cluster.shape import PodExtras, queue_labels, ray_cluster_spec
from cluster.weights import (
    VOLUME,
    pvc_manifest,
    stage_container,
    stage_job_manifest,
    wait_container,
    weights_plan,
    with_local_model,
)
from runtime.errors import ManifestInvalid, RaylaneError
from runtime.specs import dump_spec, load_spec
from runtime.vllm_env import SERVE_CLUSTER_ENV

API_VERSION = "ray.io/v1"
SPEC_DIR = "/etc/raylane"
SPEC_PATH = f"{SPEC_DIR}/spec.yaml"
SPEC_VOLUME = "raylane-spec"


def namespace_of(spec) -> str:
    return spec.kubernetes.namespace or "default"


def base_labels(spec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "raylane",
        "app.kubernetes.io/instance": spec.name,
        "raylane.dev/kind": spec.kind.lower(),
        **spec.kubernetes.labels,
    }


def serve_config_for(spec) -> dict[str, Any]:
    """The Serve config ``serve deploy`` accepts for a served spec (``shape.serve_config``)."""
    if spec.shape.serve_config is None:
        raise RaylaneError(
            f"{spec.kind} specs are not served by Ray Serve; they have no Serve config",
            hint="render them without --serve-config (a RayJob)",
        )
    return spec.shape.serve_config(spec)


def render(
    spec, *, as_cluster: bool = False, serve_config: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """All manifests for ``spec``, in apply order; the KubeRay resource is last.

    ``as_cluster=True`` renders a standalone RayCluster of the same shape (for ``raylane submit``).
    ``serve_config`` overrides the shape's Serve config builder (served shapes only).
    """
    ns = namespace_of(spec)
    labels = base_labels(spec)
    plan = weights_plan(spec)
    run_spec = shared_storage.for_cluster(with_local_model(spec, plan) if plan else spec)
    docs: list[dict[str, Any]] = []
    extras = PodExtras()
    extras.env.extend(shared_storage.pod_env(spec))
    if (pvc := shared_storage.pvc_manifest(spec, ns, {"app.kubernetes.io/name": "raylane"})) is not None:
        docs.append(pvc)
    if (vol := shared_storage.volume(spec)) is not None:
        extras.volumes.append(vol[0])
        extras.mounts.append(vol[1])
    if not spec.kubernetes.cluster_selector:
        docs.append(_spec_configmap(spec, run_spec, ns, labels))
        extras.volumes.append({"name": SPEC_VOLUME, "configMap": {"name": f"{spec.name}-spec"}})
        extras.mounts.append({"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": True})
    if plan:
        generic = {"app.kubernetes.io/name": "raylane"}
        docs.append(pvc_manifest(spec, plan, ns, generic))
        extras.volumes.append(
            {"name": VOLUME, "persistentVolumeClaim": {"claimName": plan.claim, "readOnly": True}}
        )
        extras.mounts.append({"name": VOLUME, "mountPath": plan.mount_path, "readOnly": True})
        extras.worker_init.append(wait_container(spec, plan))
        if plan.stage == "job":
            docs.append(stage_job_manifest(spec, plan, ns, generic))
            extras.head_init.append(wait_container(spec, plan))
        else:  # the head stages (read-write), the workers wait for the marker
            extras.head_init.append(stage_container(spec, plan))
            extras.head_volume_overrides[VOLUME] = {
                "name": VOLUME,
                "persistentVolumeClaim": {"claimName": plan.claim},
            }
    if as_cluster:
        main = _raycluster(spec, extras, labels, ns)
    elif spec.shape.kuberay == "RayService":
        main = _rayservice(spec, run_spec, extras, labels, ns, serve_config)
    elif getattr(spec, "schedule", None):
        main = _raycronjob(spec, run_spec, extras, labels, ns)
    else:
        main = _rayjob(spec, run_spec, extras, labels, ns)
    docs.append(main)
    check(main, source=f"{spec.kind} {spec.name!r}")
    return json.loads(json.dumps(docs))  # independent copies: no shared dicts, no YAML anchors


def check(manifest: dict[str, Any], source: str = "manifest") -> None:
    """Raise ``ManifestInvalid`` listing every CRD-schema problem and KubeRay rule violation."""
    problems = [str(v) + f" (set {v.spec_field} in the spec)" for v in rules.violations(manifest)]
    problems += _schedule_problems(manifest)
    problems += crds.check_manifest(manifest)  # the vendored KubeRay v1.7 CRDs, always there
    if problems:
        raise ManifestInvalid(
            f"{source}: the {manifest.get('kind')} would be rejected by KubeRay", problems
        )


def _schedule_problems(manifest: dict[str, Any]) -> list[str]:
    if manifest.get("kind") != "RayCronJob":
        return []
    from croniter import croniter

    schedule = manifest["spec"].get("schedule", "")
    if not croniter.is_valid(schedule):
        return [
            f"spec.schedule: {schedule!r} is not a valid cron schedule (set schedule in the spec)"
        ]
    return []


def render_yaml(spec, **kwargs) -> str:
    """``render`` as one multi-document YAML string (what ``kubectl apply -f`` reads)."""
    return yaml.safe_dump_all(render(spec, **kwargs), sort_keys=False)


def write_manifests(spec, out_dir: str | Path, **kwargs) -> list[Path]:
    """Write each manifest to ``out_dir/<name>.<kind>.yaml``; returns the paths in apply order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(render(spec, **kwargs)):
        p = out / f"{i:02d}-{doc['metadata']['name']}.{doc['kind'].lower()}.yaml"
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(p)
    return paths


def _spec_configmap(spec, run_spec, ns: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{spec.name}-spec", "namespace": ns, "labels": dict(labels)},
        "data": {"spec.yaml": yaml.safe_dump(dump_spec(run_spec), sort_keys=False)},
    }


def _metadata(spec, ns: str, labels: dict[str, str], *, queued: bool = True) -> dict[str, Any]:
    return {
        "name": spec.name,
        "namespace": ns,
        "labels": {**labels, **(queue_labels(spec) if queued else {})},
    }


def _job_spec(spec, run_spec, extras: PodExtras, labels: dict[str, str]) -> dict[str, Any]:
    k = spec.kubernetes
    module = spec.shape.job_module
    # The pods' environment carries the same (pod_env); an existing cluster gets it from here.
    runtime_env: dict[str, Any] = {"env_vars": {e["name"]: e["value"] for e in shared_storage.pod_env(spec)}}
    if k.working_dir:
        runtime_env["working_dir"] = k.working_dir
    job: dict[str, Any] = {"entrypoint": f"python -m {module} --spec {SPEC_PATH}"}
    if k.cluster_selector:
        # An existing cluster has no ConfigMap mounted: the spec rides in the runtime env instead.
        path = f"/tmp/raylane-{spec.name}.yaml"
        runtime_env["env_vars"]["RAYLANE_SPEC_B64"] = base64.b64encode(
            yaml.safe_dump(dump_spec(run_spec), sort_keys=False).encode()
        ).decode()
        job["entrypoint"] = (
            f'sh -c \'echo "$RAYLANE_SPEC_B64" | base64 -d > {path} && '
            f"exec python -m {module} --spec {path}'"
        )
        job["clusterSelector"] = {"ray.io/cluster": k.cluster_selector}
    else:
        job["rayClusterSpec"] = ray_cluster_spec(spec, extras, labels)
    job["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    job["submissionMode"] = k.submission_mode
    job["backoffLimit"] = k.backoff_limit
    job["shutdownAfterJobFinishes"] = k.shutdown_after_job_finishes
    job["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    if k.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = k.active_deadline_seconds
    if k.deletion_rules:
        job["deletionStrategy"] = {
            "deletionRules": [
                {
                    "policy": r.policy,
                    "condition": {"jobStatus": r.job_status, "ttlSeconds": r.ttl_seconds},
                }
                for r in k.deletion_rules
            ]
        }
    suspend = (
        k.suspend if k.suspend is not None else bool(spec.queue and spec.queue.system == "kueue")
    )
    if suspend:
        job["suspend"] = True  # Kueue admits (un-suspends) it when the queue has quota
    return job


def _rayjob(spec, run_spec, extras, labels, ns) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(spec, ns, labels),
        "spec": _job_spec(spec, run_spec, extras, labels),
    }


def _raycronjob(spec, run_spec, extras, labels, ns) -> dict[str, Any]:
    if spec.queue is not None:
        raise ManifestInvalid(
            f"{spec.kind} {spec.name!r}: a scheduled run cannot go through a {spec.queue.system} queue",
            [
                "queue: KubeRay's RayCronJob copies only its jobTemplate into each RayJob it creates, not the "
                "queue labels, so the queue would never see (or admit) the runs; drop queue or schedule"
            ],
        )
    cron: dict[str, Any] = {
        "schedule": spec.schedule,
        "jobTemplate": _job_spec(spec, run_spec, extras, labels),
    }
    if spec.kubernetes.time_zone:
        cron["timeZone"] = spec.kubernetes.time_zone
    metadata = _metadata(spec, ns, labels)
    # KubeRay's RayCronJob (v1.7) has no concurrencyPolicy: a tick starts a new RayJob even while
    # the last one runs. Overlap is settled in the output folder instead (runtime.batch.lease).
    metadata["annotations"] = {OVERLAP_ANNOTATION: OVERLAP_POLICY}
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCronJob",
        "metadata": metadata,
        "spec": cron,
    }


OVERLAP_ANNOTATION = "raylane.dev/overlapping-ticks"
OVERLAP_POLICY = (
    "Forbid, enforced by the output folder's lease: KubeRay starts every tick, and a tick whose "
    "output folder is still leased by the previous one exits with an error without touching it"
)


def _rayservice(spec, run_spec, extras, labels, ns, serve_config) -> dict[str, Any]:
    config = serve_config if serve_config is not None else serve_config_for(run_spec)
    extras.serve_port = int((config.get("http_options") or {}).get("port", 8000))
    # Every node runs Serve's HAProxy in front of the replicas (see runtime.serving.app).
    extras.env.extend({"name": k, "value": v} for k, v in SERVE_CLUSTER_ENV.items())
    svc: dict[str, Any] = {
        "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
        "upgradeStrategy": {"type": spec.kubernetes.upgrade_strategy},
        "rayClusterConfig": ray_cluster_spec(spec, extras, labels),
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(spec, ns, labels),
        "spec": svc,
    }


def _raycluster(spec, extras, labels, ns) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(spec, ns, labels),
        "spec": ray_cluster_spec(spec, extras, labels),
    }


def quickstart_stage(ctx) -> dict[str, Any]:
    """Quickstart stage: render every example spec to CRD-checked KubeRay manifests under the work dir."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = Path(ctx.workdir) / "kuberay"
    rendered: dict[str, str] = {}
    for path in sorted(examples.glob("*.yaml")):
        spec = load_spec(path)
        files = write_manifests(spec, out / spec.name)
        rendered[path.name] = yaml.safe_load(files[-1].read_text())["kind"]
    return {"dir": str(out), "rendered": rendered}
