"""The Kubernetes RBAC that ``raylane apply / status / logs / delete / submit --cluster`` need.

>>> from cluster.rbac import rbac_manifests
>>> role, binding = rbac_manifests("team", service_account="ci")     # doctest: +SKIP

``raylane rbac -n team --service-account ci | kubectl apply -f -`` grants exactly the requests
``cluster.client.KubeRay`` makes (tests/cluster/test_cluster_rbac.py derives them from the
client's recorded requests): nothing cluster-wide, no ``list``/``watch`` beyond pods, no ``update``.
The one sensitive grant is ``get`` on Secrets, for reading a cluster's Ray auth token (``raylane
submit --cluster``); KubeRay names those Secrets after generated cluster names, so ``resourceNames``
cannot narrow it. Leave the ``secrets`` rule out (``--no-secrets``) where only apply, status, logs
and delete are used.
"""

from __future__ import annotations

from typing import Any

ROLE_NAME = "raylane"

# (apiGroup, resources, verbs) and the client calls behind each, kept in the client's words.
RULES: list[tuple[str, list[str], list[str]]] = [
    # apply (create, then merge-patch when it exists), status/logs/wait (get), delete
    ("ray.io", ["rayjobs", "rayservices", "raycronjobs"], ["create", "get", "patch", "delete"]),
    # a RayJob's or RayService's cluster, or one rendered with `raylane render --cluster`: status,
    # logs, the auth token's owner (get) and delete; raylane never creates or patches one itself
    ("ray.io", ["rayclusters"], ["get", "delete"]),
    # the spec ConfigMap: apply creates or patches it, delete removes it
    ("", ["configmaps"], ["create", "patch", "delete"]),
    # the weight-cache PVC: created once, then left alone
    ("", ["persistentvolumeclaims"], ["create"]),
    # the staging Job: created once; a failed one is read, deleted and created again
    ("batch", ["jobs"], ["create", "get", "delete"]),
    # logs: find the submitter / head pod, read its log
    ("", ["pods"], ["list"]),
    ("", ["pods/log"], ["get"]),
    # submit --cluster: the Ray auth token KubeRay keeps in a Secret per RayCluster
    ("", ["secrets"], ["get"]),
]


def role_manifest(namespace: str, *, secrets: bool = True, name: str = ROLE_NAME) -> dict[str, Any]:
    rules = [
        {"apiGroups": [group], "resources": list(resources), "verbs": list(verbs)}
        for group, resources, verbs in RULES
        if secrets or resources != ["secrets"]
    ]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "raylane"},
        },
        "rules": rules,
    }


def role_binding_manifest(
    namespace: str,
    *,
    service_account: str | None = None,
    user: str | None = None,
    group: str | None = None,
    name: str = ROLE_NAME,
) -> dict[str, Any]:
    """A RoleBinding of the Role to a ServiceAccount (in ``namespace``), a user or a group."""
    if service_account:
        subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    elif user:
        subject = {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}
    elif group:
        subject = {"kind": "Group", "name": group, "apiGroup": "rbac.authorization.k8s.io"}
    else:
        subject = {"kind": "ServiceAccount", "name": "raylane", "namespace": namespace}
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "raylane"},
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [subject],
    }


def rbac_manifests(
    namespace: str = "default",
    *,
    service_account: str | None = None,
    user: str | None = None,
    group: str | None = None,
    secrets: bool = True,
) -> list[dict[str, Any]]:
    """The Role and an example RoleBinding (ServiceAccount ``raylane`` unless a subject is given)."""
    return [
        role_manifest(namespace, secrets=secrets),
        role_binding_manifest(namespace, service_account=service_account, user=user, group=group),
    ]
