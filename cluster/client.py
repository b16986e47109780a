"""Apply, watch, read and delete raylane's KubeRay objects with the official ``kubernetes`` client.

>>> from cluster.client import KubeRay
>>> kr = KubeRay.connect()                              # kubeconfig, else in-cluster  # doctest: +SKIP
>>> kr.apply(load_spec("examples/batch.yaml"), wait=True, timeout_s=3600).ok            # doctest: +SKIP
>>> kr.status("nightly-batch").state                                                    # doctest: +SKIP

``apply`` renders and checks the manifests first (nothing is sent when a rule is broken), then
creates each object or, when it exists, merge-patches it (the Ray object and the spec ConfigMap;
the shared weights PVC and staging Job are left alone once they exist). A RayJob succeeds only
when ``status.jobStatus`` is SUCCEEDED: a ``Complete`` deployment status only says the job
ended. API-server errors are shown as the server worded them.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.render import render
from cluster.storage import check_storage
from runtime.errors import KubernetesError, RaylaneError

GROUP, VERSION = "ray.io", "v1"
PLURALS = {
    "RayJob": "rayjobs",
    "RayService": "rayservices",
    "RayCronJob": "raycronjobs",
    "RayCluster": "rayclusters",
}
KUBERAY_KINDS = list(PLURALS)  # every kind raylane creates, in the order `get` looks a name up
JOB_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
JOB_RECREATE_ATTEMPTS = 10
DASHBOARD_PORT = 8265
TOKEN_KEY = "auth_token"  # the data key of KubeRay's token Secret (RAY_AUTH_TOKEN_SECRET_KEY)


@dataclass
class DashboardAuth:
    cluster: str  # the RayCluster's name
    address: str  # its Jobs API inside the cluster network
    token: str | None  # None: the cluster has token auth off
    secret: str | None = None  # where the token came from

    def __repr__(self) -> str:  # never print the token
        return f"DashboardAuth(cluster={self.cluster!r}, address={self.address!r}, secret={self.secret!r})"


def kuberay_check_name(name: str) -> str:
    """KubeRay's ``utils.CheckName``: the name it gives a RayCluster's token Secret."""
    if len(name) > 50:
        name = name[len(name) - 50 :]
    if name[0].isdigit() or not name[0].isalnum():
        name = "r" + name[1:]
    return name


def job_failed(job: dict[str, Any]) -> bool:
    """Whether a batch/v1 Job has given up (its Failed condition is True)."""
    conds = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in conds)


@dataclass
class ObjectStatus:
    kind: str
    name: str
    namespace: str
    state: str  # jobStatus / serviceStatus / cluster state, or 'Scheduled'
    ok: bool | None  # True success, False failure, None still going
    message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ApplyResult:
    kind: str
    name: str
    namespace: str
    created: list[str]
    patched: list[str]
    unchanged: list[str]
    status: ObjectStatus | None = None
    recreated: list[str] = field(default_factory=list)  # failed staging Jobs deleted and created again

    @property
    def ok(self) -> bool:
        return self.status is None or self.status.ok is not False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def summarize(obj: dict[str, Any]) -> ObjectStatus:
    """What a KubeRay object's status says, reduced to a state and success/failure/pending."""
    kind, meta, st = obj.get("kind", ""), obj.get("metadata") or {}, obj.get("status") or {}
    name, ns = meta.get("name", ""), meta.get("namespace", "")
    if kind == "RayJob":
        job, deploy = st.get("jobStatus"), st.get("jobDeploymentStatus")
        details = {
            k: st[k]
            for k in (
                "jobDeploymentStatus",
                "jobStatus",
                "jobId",
                "rayClusterName",
                "dashboardURL",
                "startTime",
                "endTime",
                "reason",
                "failed",
                "succeeded",
            )
            if k in st
        }
        if job == "SUCCEEDED":
            ok = True
        elif job in ("FAILED", "STOPPED") or deploy in ("Failed", "ValidationFailed"):
            ok = False
        elif deploy == "Complete":
            ok = False  # the deployment finished but the job did not report SUCCEEDED
        else:
            ok = None
        if (obj.get("spec") or {}).get("suspend") and not deploy:
            state = "Suspended"
        else:
            state = job or deploy or "Pending"
        return ObjectStatus(kind, name, ns, state, ok, st.get("message"), details)
    if kind == "RayService":
        conds = {c.get("type"): c for c in st.get("conditions") or []}
        ready = conds.get("Ready", {})
        ok = True if ready.get("status") == "True" or st.get("serviceStatus") == "Running" else None
        state = "Ready" if ok else (ready.get("reason") or st.get("serviceStatus") or "Pending")
        active = st.get("activeServiceStatus") or {}
        details = {
            "applications": {
                k: v.get("status") for k, v in (active.get("applicationStatuses") or {}).items()
            },
            "rayClusterName": active.get("rayClusterName"),
            "numServeEndpoints": st.get("numServeEndpoints"),
        }
        return ObjectStatus(kind, name, ns, state, ok, ready.get("message"), details)
    if kind == "RayCronJob":
        last = st.get("lastScheduleTime")
        state = "Suspended" if (obj.get("spec") or {}).get("suspend") else "Scheduled"
        return ObjectStatus(
            kind,
            name,
            ns,
            state,
            True,
            None,
            {"schedule": (obj.get("spec") or {}).get("schedule"), "lastScheduleTime": last},
        )
    state = st.get("state") or "Pending"
    return ObjectStatus(
        kind,
        name,
        ns,
        state,
        True if state == "ready" else None,
        st.get("reason"),
        {"readyWorkerReplicas": st.get("readyWorkerReplicas")},
    )


class KubeRay:
    """raylane's operations on a Kubernetes cluster running the KubeRay operator."""

    def __init__(self, api_client, namespace: str = "default"):
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    @classmethod
    def connect(cls, context: str | None = None, kubeconfig: str | None = None) -> KubeRay:
        """From the kubeconfig (``$KUBECONFIG`` or ~/.kube/config), else the in-cluster service account."""
        from kubernetes import client, config

        cfg = client.Configuration()
        namespace = "default"
        try:
            config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=cfg
            )
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                active = next(
                    (
                        c
                        for c in config.list_kube_config_contexts(config_file=kubeconfig)[0]
                        if c["name"] == context
                    ),
                    active,
                )
            namespace = (active or {}).get("context", {}).get("namespace") or "default"
        except Exception as kube_err:  # no kubeconfig: try the pod's service account
            try:
                config.load_incluster_config(client_configuration=cfg)
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    namespace = f.read().strip() or "default"
            except Exception:
                raise KubernetesError(
                    f"no Kubernetes cluster configured: {kube_err}",
                    hint="point KUBECONFIG at a kubeconfig (or run inside a pod with a service account)",
                ) from None
        return cls(client.ApiClient(cfg), namespace)

    # -- apply ---------------------------------------------------------------------------------
    def apply(
        self,
        spec,
        *,
        wait: bool = False,
        timeout_s: float = 3600,
        poll_s: float = 5.0,
        progress: Callable[[str], None] | None = None,
    ) -> ApplyResult:
        """Create or patch every manifest of ``spec`` (checked first); optionally wait for the result."""
        check_storage(spec)  # a run whose files would die with its pods: SpecError, nothing sent
        docs = render(spec)  # raises ManifestInvalid before anything is sent
        ns = spec.kubernetes.namespace or self.namespace
        created, patched, unchanged, recreated = [], [], [], []
        for doc in docs:
            doc["metadata"]["namespace"] = ns
            outcome = self._create_or_patch(doc, ns)
            label = f"{doc['kind']}/{doc['metadata']['name']}"
            buckets = {
                "created": created,
                "patched": patched,
                "unchanged": unchanged,
                "recreated": recreated,
            }
            buckets[outcome].append(label)
            if progress:
                progress(f"{label} {outcome}")
        main = docs[-1]
        result = ApplyResult(
            main["kind"], main["metadata"]["name"], ns, created, patched, unchanged
        )
        result.recreated = recreated
        if wait and main["kind"] in ("RayJob", "RayService"):
            result.status = self.wait(
                main["metadata"]["name"],
                kind=main["kind"],
                namespace=ns,
                timeout_s=timeout_s,
                poll_s=poll_s,
                progress=progress,
            )
        return result

    def _create_or_patch(self, doc: dict[str, Any], ns: str) -> str:
        from kubernetes.client.exceptions import ApiException

        kind, name = doc["kind"], doc["metadata"]["name"]
        try:
            if kind in PLURALS:
                self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[kind], doc)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, doc)
            elif kind == "PersistentVolumeClaim":
                self.core.create_namespaced_persistent_volume_claim(ns, doc)
            elif kind == "Job":
                self.batch.create_namespaced_job(ns, doc)
            else:
                raise RaylaneError(f"raylane does not apply {kind} objects")
            return "created"
        except ApiException as e:
            if e.status != 409:
                raise _api_error(e, f"create {kind}/{name}") from None
        # It exists. The PVC (immutable size/modes) and the staging Job (immutable template) stay,
        # except a staging Job that failed: pods would wait for its weights forever.
        if kind == "Job":
            return self._recreate_failed_job(doc, ns)
        if kind == "PersistentVolumeClaim":
            return "unchanged"
        try:
            if kind in PLURALS:
                self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURALS[kind], name, doc
                )
            else:
                self.core.patch_namespaced_config_map(
                    name, ns, doc, _content_type="application/merge-patch+json"
                )
        except ApiException as e:
            raise _api_error(e, f"patch {kind}/{name}") from None
        return "patched"

    def _recreate_failed_job(self, doc: dict[str, Any], ns: str) -> str:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        name = doc["metadata"]["name"]
        try:
            job = self.api_client.sanitize_for_serialization(
                self.batch.read_namespaced_job(name, ns)
            )
        except ApiException as e:
            raise _api_error(e, f"get Job/{name}") from None
        if not job_failed(job):
            return "unchanged"  # done or still copying: the weights are (or will be) there
        try:
            self.batch.delete_namespaced_job(
                name, ns, body=client.V1DeleteOptions(propagation_policy="Background")
            )
        except ApiException as e:
            if e.status != 404:
                raise _api_error(e, f"delete failed Job/{name}") from None
        # Background propagation removes the Job object at once; a finalizer can delay it a little.
        for attempt in range(JOB_RECREATE_ATTEMPTS):
            try:
                self.batch.create_namespaced_job(ns, doc)
                return "recreated"
            except ApiException as e:
                if e.status != 409 or attempt == JOB_RECREATE_ATTEMPTS - 1:
                    raise _api_error(e, f"recreate failed Job/{name}") from None
            time.sleep(1.0)
        return "recreated"  # not reached

    # -- Ray dashboard access ------------------------------------------------------------------
    def dashboard_auth(
        self, name: str, *, kind: str | None = None, namespace: str | None = None
    ) -> DashboardAuth:
        """The in-cluster Jobs API address of ``name``'s Ray cluster and its auth token (None when
        the cluster runs without token auth), read from the Secret KubeRay keeps the token in.

        ``name`` is a RayCluster, or a RayJob / RayService whose current cluster is used.
        """
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self.namespace
        obj = self.get(name, kind=kind, namespace=ns)
        st = obj.get("status") or {}
        if obj["kind"] == "RayCluster":
            cluster = obj
        else:
            cluster_name = st.get("rayClusterName") or (st.get("activeServiceStatus") or {}).get(
                "rayClusterName"
            )
            if not cluster_name:
                raise KubernetesError(
                    f"{obj['kind']}/{name} has no Ray cluster yet",
                    hint=f"wait until `raylane status {name}` shows it running",
                )
            cluster = self.get(cluster_name, kind="RayCluster", namespace=ns)
        cluster_name = cluster["metadata"]["name"]
        svc = ((cluster.get("status") or {}).get("head") or {}).get("serviceName") or (
            f"{cluster_name}-head-svc"
        )
        address = f"http://{svc}.{ns}.svc:{DASHBOARD_PORT}"
        auth = (cluster.get("spec") or {}).get("authOptions") or {}
        if auth.get("mode", "token" if auth else "disabled") != "token":
            return DashboardAuth(cluster_name, address, None, None)
        if auth.get("enableK8sTokenAuth"):
            raise KubernetesError(
                f"RayCluster/{cluster_name} delegates auth to Kubernetes service-account tokens "
                "(authOptions.enableK8sTokenAuth)",
                hint="submit with `ray job submit` and a token your RBAC grants ray:write",
            )
        secret = auth.get("secretName") or kuberay_check_name(cluster_name)
        try:
            data = self.core.read_namespaced_secret(secret, ns).data or {}
        except ApiException as e:
            if e.status == 404:
                raise KubernetesError(
                    f"the auth token Secret {secret!r} of RayCluster/{cluster_name} does not exist (yet)",
                    hint="KubeRay creates it when it reconciles the cluster; check "
                    f"`kubectl get secret {secret} -n {ns}`",
                ) from None
            raise _api_error(e, f"get Secret/{secret}") from None
        if TOKEN_KEY not in data:
            raise KubernetesError(
                f"Secret {secret!r} has no {TOKEN_KEY!r} key (KubeRay keeps the Ray token there)",
                hint=f"`kubectl get secret {secret} -n {ns} -o yaml` shows its keys",
            )
        token = base64.b64decode(data[TOKEN_KEY]).decode().strip()
        return DashboardAuth(cluster_name, address, token, secret)

    # -- read ----------------------------------------------------------------------------------
    def get(
        self, name: str, *, kind: str | None = None, namespace: str | None = None
    ) -> dict[str, Any]:
        """The object named ``name`` (any raylane KubeRay kind unless ``kind`` is given)."""
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self.namespace
        kinds = [kind] if kind else KUBERAY_KINDS
        for k in kinds:
            try:
                return self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURALS[k], name
                )
            except ApiException as e:
                if e.status != 404:
                    raise _api_error(e, f"get {k}/{name}") from None
        raise KubernetesError(
            f"no {' or '.join(kinds)} named {name!r} in namespace {ns!r}",
            hint="check the name and --namespace (`kubectl get rayjobs,rayservices -A`)",
        )

    def status(
        self, name: str, *, kind: str | None = None, namespace: str | None = None
    ) -> ObjectStatus:
        return summarize(self.get(name, kind=kind, namespace=namespace))

    def wait(
        self,
        name: str,
        *,
        kind: str | None = None,
        namespace: str | None = None,
        timeout_s: float = 3600,
        poll_s: float = 5.0,
        progress: Callable[[str], None] | None = None,
    ) -> ObjectStatus:
        """Poll until the object succeeds or fails; on timeout raise with its last state."""
        deadline = time.monotonic() + timeout_s
        last = None
        delay = min(1.0, poll_s)  # quick first looks, then back off to poll_s
        while True:
            st = self.status(name, kind=kind, namespace=namespace)
            if progress and st.state != last:
                progress(f"{st.kind}/{st.name}: {st.state}")
                last = st.state
            if st.ok is not None:
                return st
            if time.monotonic() >= deadline:
                raise RaylaneError(
                    f"{st.kind}/{name} still {st.state} after {timeout_s:g} s",
                    hint=f"it keeps going; watch it with `raylane status {name}`",
                )
            time.sleep(delay)
            delay = min(delay * 2, poll_s)

    def logs(
        self, name: str, *, namespace: str | None = None, tail_lines: int | None = None
    ) -> str:
        """Logs of a RayJob's submitter (the driver output) or of the head pod of its cluster."""
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self.namespace
        obj = self.get(name, namespace=ns)
        st = obj.get("status") or {}
        selectors = []
        if obj["kind"] == "RayJob":
            selectors.append(f"job-name={name}")  # K8sJobMode: the submitter Job streams the driver
        cluster = st.get("rayClusterName") or (
            (st.get("activeServiceStatus") or {}).get("rayClusterName")
        )
        if obj["kind"] == "RayCluster":
            cluster = name
        if cluster:
            selectors.append(f"ray.io/cluster={cluster},ray.io/node-type=head")
        for selector in selectors:
            try:
                pods = self.core.list_namespaced_pod(ns, label_selector=selector).items
                if pods:
                    return self.core.read_namespaced_pod_log(
                        pods[0].metadata.name, ns, tail_lines=tail_lines
                    )
            except ApiException as e:
                raise _api_error(e, f"read logs of {obj['kind']}/{name}") from None
        raise KubernetesError(
            f"{obj['kind']}/{name} has no pods with logs yet",
            hint=f"`raylane status {name}` shows where it is",
        )

    # -- delete --------------------------------------------------------------------------------
    def delete(
        self, name: str, *, kind: str | None = None, namespace: str | None = None
    ) -> dict[str, Any]:
        """Delete the KubeRay object and its spec ConfigMap (the shared weight cache stays)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self.namespace
        obj = self.get(name, kind=kind, namespace=ns)
        body = client.V1DeleteOptions(propagation_policy="Background")
        deleted = []
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURALS[obj["kind"]], name, body=body
            )
            deleted.append(f"{obj['kind']}/{name}")
            self.core.delete_namespaced_config_map(f"{name}-spec", ns, body=body)
            deleted.append(f"ConfigMap/{name}-spec")
        except ApiException as e:
            if e.status != 404:
                raise _api_error(e, f"delete {obj['kind']}/{name}") from None
        return {"kind": obj["kind"], "name": name, "namespace": ns, "deleted": deleted}


def _api_error(e, action: str) -> KubernetesError:
    """The API server's own message (its Status object), not the client's HTTP dump."""
    message = e.reason or "error"
    try:
        body = json.loads(e.body or "{}")
        message = body.get("message") or message
    except (ValueError, TypeError):
        if e.body:
            message = str(e.body)[:500]
    hint = None
    if e.status == 404 and "the server could not find the requested resource" in message:
        hint = "is the KubeRay operator (its CRDs) installed? `kubectl get crd rayjobs.ray.io`"
    elif e.status in (401, 403):
        hint = "check your kubeconfig credentials and RBAC for ray.io resources"
    return KubernetesError(f"Kubernetes API: {action} failed ({e.status}): {message}", hint=hint)
