"""KubeRay's own validation rules, checked before anything is sent to a cluster.

>>> from cluster.rules import violations
>>> violations(manifest)       # [] or [Violation(field, message, spec_field)]   # doctest: +SKIP

The CRD schema cannot express these; the KubeRay operator checks them at reconcile time
(ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7) and a violating object is
accepted by the API server, then sits there with only a warning event. raylane checks the same
rules on the rendered manifest, so the error comes before ``kubectl apply``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# KubeRay appends "-" plus 5 random characters to a RayJob/RayService name to name its RayCluster
# (max 53), and a RayCronJob appends the same to name each RayJob it creates.
MAX_RAYCLUSTER_NAME = 53
MAX_NAME = {
    "RayCluster": MAX_RAYCLUSTER_NAME,
    "RayJob": MAX_RAYCLUSTER_NAME - 6,
    "RayService": MAX_RAYCLUSTER_NAME - 6,
    "RayCronJob": MAX_RAYCLUSTER_NAME - 12,
}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")


@dataclass(frozen=True)
class Violation:
    field: str  # where in the manifest
    message: str  # what is wrong
    spec_field: str  # the spec field that sets it (how to fix)

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def violations(manifest: dict[str, Any]) -> list[Violation]:
    """Every KubeRay rule a RayJob, RayService, RayCronJob or RayCluster manifest breaks."""
    kind = manifest.get("kind")
    name = (manifest.get("metadata") or {}).get("name", "")
    spec = manifest.get("spec") or {}
    out = _name_rules(kind, name)
    if kind == "RayJob":
        out += _rayjob_rules(spec, "spec")
    elif kind == "RayCronJob":
        out += _rayjob_rules(spec.get("jobTemplate") or {}, "spec.jobTemplate")
    elif kind == "RayService":
        out += _cluster_rules(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig")
        out += _rayservice_rules(spec)
    elif kind == "RayCluster":
        out += _cluster_rules(spec, "spec")
    return out


def _name_rules(kind: str, name: str) -> list[Violation]:
    out = []
    limit = MAX_NAME.get(kind)
    if limit and len(name) > limit:
        why = (
            "each RayJob it creates adds 6 more"
            if kind == "RayCronJob"
            else "its RayCluster adds 6 more"
        )
        out.append(
            Violation(
                "metadata.name",
                f"{kind} name {name!r} has {len(name)} characters; KubeRay allows "
                f"at most {limit} ({why}, and a RayCluster name is at most 53)",
                "name",
            )
        )
    if name and not DNS1035.match(name):
        out.append(
            Violation(
                "metadata.name",
                f"{kind} name {name!r} must be a DNS-1035 label: start with a "
                "letter, then lowercase letters, digits and '-'",
                "name",
            )
        )
    return out


def _rayjob_rules(spec: dict[str, Any], at: str) -> list[Violation]:
    out: list[Violation] = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    selector = spec.get("clusterSelector") or {}
    cluster = spec.get("rayClusterSpec")
    mode = spec.get("submissionMode", "K8sJobMode")
    rules = ((spec.get("deletionStrategy") or {}).get("deletionRules")) or []
    k = "kubernetes."
    if bool(cluster) == bool(selector):
        out.append(
            Violation(
                f"{at}.rayClusterSpec",
                "set exactly one of rayClusterSpec (a new cluster) and "
                "clusterSelector (an existing one)",
                k + "cluster_selector",
            )
        )
    if selector and not selector.get("ray.io/cluster"):
        out.append(
            Violation(
                f"{at}.clusterSelector",
                "needs the 'ray.io/cluster' key naming the cluster",
                k + "cluster_selector",
            )
        )
    if spec.get("suspend") and not shutdown:
        out.append(
            Violation(
                f"{at}.suspend",
                "a suspended RayJob (e.g. queued by Kueue) needs shutdownAfterJobFinishes: true",
                k + "shutdown_after_job_finishes",
            )
        )
    if spec.get("suspend") and selector:
        out.append(
            Violation(
                f"{at}.suspend",
                "a RayJob on an existing cluster (clusterSelector) cannot be suspended",
                k + "suspend",
            )
        )
    if (spec.get("ttlSecondsAfterFinished") or 0) > 0 and not shutdown:
        out.append(
            Violation(
                f"{at}.ttlSecondsAfterFinished",
                "a TTL needs shutdownAfterJobFinishes: true (set the TTL to 0 or turn shutdown on)",
                k + "ttl_seconds_after_finished",
            )
        )
    if (spec.get("ttlSecondsAfterFinished") or 0) < 0:
        out.append(
            Violation(
                f"{at}.ttlSecondsAfterFinished", "must be >= 0", k + "ttl_seconds_after_finished"
            )
        )
    if rules and shutdown:
        out.append(
            Violation(
                f"{at}.deletionStrategy.deletionRules",
                "deletionRules and "
                "shutdownAfterJobFinishes are mutually exclusive (turn shutdown off and set the "
                "TTL to 0)",
                k + "deletion_rules",
            )
        )
    if rules and ({"onSuccess", "onFailure"} & set(spec.get("deletionStrategy") or {})):
        out.append(
            Violation(
                f"{at}.deletionStrategy",
                "deletionRules cannot be combined with onSuccess/onFailure",
                k + "deletion_rules",
            )
        )
    autoscaling = bool((cluster or {}).get("enableInTreeAutoscaling"))
    seen: dict[tuple, int] = {}
    for i, r in enumerate(rules):
        policy = r.get("policy")
        status = (r.get("condition") or {}).get("jobStatus")
        where = f"{at}.deletionStrategy.deletionRules[{i}]"
        if selector and policy in ("DeleteCluster", "DeleteWorkers"):
            out.append(
                Violation(
                    where,
                    f"{policy} cannot be used on an existing cluster (clusterSelector)",
                    k + "deletion_rules",
                )
            )
        if autoscaling and policy == "DeleteWorkers":
            out.append(
                Violation(
                    where,
                    "DeleteWorkers does not work with autoscaling enabled",
                    k + "deletion_rules",
                )
            )
        if (status, policy) in seen:
            out.append(
                Violation(where, f"duplicate rule for {policy} on {status}", k + "deletion_rules")
            )
        seen[(status, policy)] = (r.get("condition") or {}).get("ttlSeconds", 0)
    order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
    for status in {s for s, _ in seen}:
        ttls = [(p, seen[(status, p)]) for p in order if (status, p) in seen]
        for (p1, t1), (p2, t2) in zip(ttls, ttls[1:]):
            if t2 < t1:
                out.append(
                    Violation(
                        f"{at}.deletionStrategy.deletionRules",
                        f"for {status}: {p2} TTL ({t2}) must be >= {p1} TTL ({t1})",
                        k + "deletion_rules",
                    )
                )
    if selector and mode == "SidecarMode":
        out.append(
            Violation(
                f"{at}.submissionMode",
                "SidecarMode cannot run on an existing cluster",
                k + "submission_mode",
            )
        )
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        out.append(
            Violation(
                f"{at}.backoffLimit",
                "InteractiveMode does not allow retries (backoffLimit 0)",
                k + "backoff_limit",
            )
        )
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        out.append(
            Violation(
                f"{at}.submissionMode",
                "SidecarMode supports no submitter pod template or config",
                k + "submission_mode",
            )
        )
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        out.append(
            Violation(
                f"{at}.activeDeadlineSeconds",
                "must be a positive number of seconds",
                k + "active_deadline_seconds",
            )
        )
    if (spec.get("backoffLimit") or 0) < 0:
        out.append(Violation(f"{at}.backoffLimit", "must be >= 0", k + "backoff_limit"))
    if cluster:
        out += _cluster_rules(cluster, f"{at}.rayClusterSpec")
    return out


def _cluster_rules(cluster: dict[str, Any], at: str) -> list[Violation]:
    out: list[Violation] = []
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])
    ]
    for where, g in groups:
        containers = ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            out.append(
                Violation(
                    f"{at}.{where}.template", "needs at least one container", "kubernetes.image"
                )
            )
        params = g.get("rayStartParams") or {}
        if g.get("resources") and any(
            params.get(p) for p in ("num-cpus", "num-gpus", "memory", "resources")
        ):
            out.append(
                Violation(
                    f"{at}.{where}",
                    "set Ray resources in rayStartParams or in resources, not both",
                    "resources",
                )
            )
        if "labels" in params:
            out.append(
                Violation(
                    f"{at}.{where}.rayStartParams",
                    "use the group's labels field, not rayStartParams['labels']",
                    "kubernetes.labels",
                )
            )
        if cluster.get("enableInTreeAutoscaling") and g.get("suspend"):
            out.append(
                Violation(
                    f"{at}.{where}.suspend",
                    "a worker group cannot be suspended with autoscaling",
                    "kubernetes.autoscaling",
                )
            )
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            out.append(
                Violation(
                    f"{at}.{where}.minReplicas",
                    f"minReplicas ({lo}) exceeds maxReplicas ({hi})",
                    "kubernetes.min_replicas",
                )
            )
    return out


def _rayservice_rules(spec: dict[str, Any]) -> list[Violation]:
    out: list[Violation] = []
    strategy = spec.get("upgradeStrategy") or {}
    kind = strategy.get("type")
    k = "kubernetes.upgrade_strategy"
    if kind is not None and kind not in UPGRADE_TYPES:
        out.append(
            Violation(
                "spec.upgradeStrategy.type", f"{kind!r} is not one of {', '.join(UPGRADE_TYPES)}", k
            )
        )
    if kind == "NewClusterWithIncrementalUpgrade":
        if not (spec.get("rayClusterConfig") or {}).get("enableInTreeAutoscaling"):
            out.append(
                Violation(
                    "spec.upgradeStrategy.type", "incremental upgrades need autoscaling on", k
                )
            )
        opts = strategy.get("clusterUpgradeOptions")
        if not opts or not opts.get("gatewayClassName"):
            out.append(
                Violation(
                    "spec.upgradeStrategy.clusterUpgradeOptions",
                    "incremental upgrades need "
                    "clusterUpgradeOptions with a gatewayClassName (a Gateway API class)",
                    k,
                )
            )
    if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
        out.append(Violation("spec.rayClusterDeletionDelaySeconds", "must be >= 0", k))
    head_svc = ((spec.get("rayClusterConfig") or {}).get("headGroupSpec") or {}).get(
        "headService"
    ) or {}
    if (head_svc.get("metadata") or {}).get("name"):
        out.append(
            Violation(
                "spec.rayClusterConfig.headGroupSpec.headService.metadata.name",
                "must not be set for a RayService",
                "kubernetes",
            )
        )
    return out
