"""Cluster-side hardening: KubeRay token auth on every rendered cluster, restrictive security
contexts on every pod and container, the token read back from KubeRay's Secret, failed staging
Jobs recreated, a wait-for-weights step that gives up with a message, and the RBAC Role that
covers exactly the requests the client makes."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import replace

import pytest
import yaml
from conftest import run_cli

from cluster import crds
from cluster.render import render
from runtime.errors import KubernetesError
from runtime.specs import parse_spec
from runtime.specs.common import DEFAULT_CONTAINER_SECURITY_CONTEXT, DEFAULT_POD_SECURITY_CONTEXT
from tests.cluster.test_cluster_render import cluster_of

NS = "team"
BATCH = {
    "kind": "BatchInference",
    "name": "nightly",
    "model": "tiny",
    "input": {"path": "s3://b/in.jsonl"},
    "output": {"path": "s3://b/out"},
    "storage": {"root": "s3://b/raylane"},  # on the cluster, not inside the pods (cluster.storage)
}
CRON = {**BATCH, "name": "cron", "schedule": "0 2 * * *"}
SERVE = {"kind": "OnlineInference", "name": "chat", "model": "tiny"}
AGENT = {"kind": "Agent", "name": "helper"}
TRAIN = {"kind": "Training", "name": "pretrain", "data": {"path": "s3://b/train.parquet"}}
RAY = f"/apis/ray.io/v1/namespaces/{NS}"
CORE = f"/api/v1/namespaces/{NS}"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"


def pod_specs(docs):
    """Every pod spec the manifests create: Ray head and worker templates, the staging Job's pod."""
    out = []
    for d in docs:
        if d["kind"] == "Job":
            out.append(("stage-job", d["spec"]["template"]["spec"]))
        elif d["kind"].startswith("Ray"):
            c = cluster_of(d)
            out.append(("head", c["headGroupSpec"]["template"]["spec"]))
            out += [(g["groupName"], g["template"]["spec"]) for g in c["workerGroupSpecs"]]
    return out


CASES = {
    "RayJob": (BATCH, {}),
    "RayCronJob": (CRON, {}),
    "RayService": (SERVE, {}),
    "RayService-agent": (AGENT, {}),
    "RayJob-training": (TRAIN, {}),
    "RayCluster": (BATCH, {"as_cluster": True}),
}


# -- token auth ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_every_rendered_cluster_has_token_auth(case):
    raw, kw = CASES[case]
    m = render(parse_spec(raw), **kw)[-1]
    assert m["kind"] == case.split("-")[0]
    assert cluster_of(m)["authOptions"] == {"mode": "token"}
    # KubeRay refuses token mode below Ray 2.52; the rendered version must allow it
    major, minor, _ = (int(x) for x in cluster_of(m)["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)
    if crds.crd_dir():
        assert crds.check_manifest(m) == []


def test_auth_none_renders_disabled_explicitly():
    m = render(parse_spec({**SERVE, "kubernetes": {"auth": "none"}}))[-1]
    assert cluster_of(m)["authOptions"] == {"mode": "disabled"}
    if crds.crd_dir():
        assert crds.check_manifest(m) == []


def test_auth_typo_is_a_spec_error():
    from runtime.errors import SpecError

    with pytest.raises(SpecError, match=r"kubernetes.auth: Input should be 'token' or 'none' \(got 'off'\)"):
        parse_spec({**SERVE, "kubernetes": {"auth": "off"}})


def test_existing_cluster_keeps_its_own_auth():
    m = render(parse_spec({**BATCH, "kubernetes": {"cluster_selector": "shared"}}))[-1]
    assert "rayClusterSpec" not in m["spec"] and "authOptions" not in m["spec"]


# -- securityContext -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_every_pod_and_container_is_restricted(case):
    raw, kw = CASES[case]
    docs = render(parse_spec(raw), **kw)
    pods = pod_specs(docs)
    assert len(pods) >= 2
    for where, pod in pods:
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 100,
            "fsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, where
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }, (where, c["name"])
    # the autoscaler sidecar KubeRay injects into the head pod
    assert cluster_of(docs[-1])["autoscalerOptions"]["securityContext"] == DEFAULT_CONTAINER_SECURITY_CONTEXT
    if crds.crd_dir():
        assert crds.check_manifest(docs[-1]) == []


def test_init_container_staging_is_restricted_too():
    spec = parse_spec({**BATCH, "kubernetes": {"weights": {"stage": "init-container"}}})
    head = cluster_of(render(spec)[-1])["headGroupSpec"]["template"]["spec"]
    stager = head["initContainers"][0]
    assert stager["name"] == "stage-weights"
    assert stager["securityContext"] == DEFAULT_CONTAINER_SECURITY_CONTEXT


def test_security_contexts_are_overridable():
    custom_pod = {"runAsNonRoot": True, "runAsUser": 2000, "seccompProfile": {"type": "RuntimeDefault"}}
    custom_c = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}
    docs = render(
        parse_spec(
            {
                **SERVE,
                "kubernetes": {
                    "pod_security_context": custom_pod,
                    "container_security_context": custom_c,
                },
            }
        )
    )
    for _, pod in pod_specs(docs):
        assert pod["securityContext"] == custom_pod
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"] == custom_c
    if crds.crd_dir():
        assert crds.check_manifest(docs[-1]) == []
    # {} renders none at all (an image that must run as root)
    docs = render(
        parse_spec(
            {**SERVE, "kubernetes": {"pod_security_context": {}, "container_security_context": {}}}
        )
    )
    assert "securityContext" not in cluster_of(docs[-1])["autoscalerOptions"]
    for _, pod in pod_specs(docs):
        assert "securityContext" not in pod
        assert all("securityContext" not in c for c in pod["containers"] + pod.get("initContainers", []))
    # the defaults are copies: rendering never mutates the module-level defaults
    assert DEFAULT_POD_SECURITY_CONTEXT["runAsUser"] == 1000


# -- wait-for-weights ------------------------------------------------------------------------------
def _wait_command(**weights):
    docs = render(parse_spec({**BATCH, "kubernetes": {"weights": weights}}))
    worker = cluster_of(docs[-1])["workerGroupSpecs"][0]["template"]["spec"]
    (wait,) = [c for c in worker["initContainers"] if c["name"] == "wait-for-weights"]
    return wait["command"]


def test_wait_step_gives_up_with_a_clear_message(tmp_path):
    cmd = _wait_command(mount_path=str(tmp_path), wait_timeout_s=1)
    assert cmd[:2] == ["sh", "-c"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"raylane: the weights of tiny are not staged at {tmp_path}/tiny-8950abfd after 1 s: "
        "the staging Job stage-tiny-8950abfd failed or is still copying "
        "(kubectl logs job/stage-tiny-8950abfd); fix the cause, then run raylane apply again "
        "(it recreates a failed staging Job)"
    )


def test_wait_step_passes_once_the_marker_exists(tmp_path):
    from cluster.weights import MARKER

    cmd = _wait_command(mount_path=str(tmp_path), wait_timeout_s=60)
    (tmp_path / "tiny-8950abfd").mkdir()
    (tmp_path / "tiny-8950abfd" / MARKER).write_text("tiny\n")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0 and r.stderr == ""


def test_wait_message_cannot_break_out_of_the_shell(tmp_path):
    from cluster.weights import wait_script, weights_plan

    plan = weights_plan(parse_spec({**BATCH, "model": f'x"; touch {tmp_path}/pwned; echo "`id`$HOME'}))
    plan = replace(plan, mount_path=str(tmp_path))
    r = subprocess.run(["sh", "-c", wait_script(plan, 1)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 1 and not (tmp_path / "pwned").exists()
    assert f'x"; touch {tmp_path}/pwned; echo "`id`$HOME' in r.stderr


# -- the token, read from KubeRay's Secret -----------------------------------------------------------
def _raycluster(name, auth=None, service=None):
    obj = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"rayVersion": "2.60.0"},
        "status": {"state": "ready"},
    }
    if auth is not None:
        obj["spec"]["authOptions"] = auth
    if service:
        obj["status"]["head"] = {"serviceName": service}
    return obj


def _secret(name, token):
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {"auth_token": base64.b64encode(token.encode()).decode()},
    }


def test_token_of_a_rayjob_cluster_comes_from_its_secret(fake_kube, kuberay):
    fake_kube.objects[f"{RAY}/rayjobs/nightly"] = {
        "kind": "RayJob",
        "metadata": {"name": "nightly", "namespace": NS},
        "status": {"rayClusterName": "nightly-x7k2p", "jobDeploymentStatus": "Running"},
    }
    fake_kube.objects[f"{RAY}/rayclusters/nightly-x7k2p"] = _raycluster(
        "nightly-x7k2p", {"mode": "token"}, service="nightly-x7k2p-head-svc"
    )
    fake_kube.objects[f"{CORE}/secrets/nightly-x7k2p"] = _secret("nightly-x7k2p", "s3cr3t-token")
    auth = kuberay.dashboard_auth("nightly")
    assert fake_kube.calls() == [
        ("GET", f"{RAY}/rayjobs/nightly"),
        ("GET", f"{RAY}/rayclusters/nightly-x7k2p"),
        ("GET", f"{CORE}/secrets/nightly-x7k2p"),
    ]
    assert (auth.cluster, auth.token, auth.secret) == ("nightly-x7k2p", "s3cr3t-token", "nightly-x7k2p")
    assert auth.address == "http://nightly-x7k2p-head-svc.team.svc:8265"
    assert "s3cr3t" not in repr(auth)


def test_token_of_a_rayservice_and_a_custom_secret(fake_kube, kuberay):
    fake_kube.objects[f"{RAY}/rayservices/chat"] = {
        "kind": "RayService",
        "metadata": {"name": "chat", "namespace": NS},
        "status": {"activeServiceStatus": {"rayClusterName": "chat-abcde"}},
    }
    fake_kube.objects[f"{RAY}/rayclusters/chat-abcde"] = _raycluster(
        "chat-abcde", {"mode": "token", "secretName": "my-token"}
    )
    fake_kube.objects[f"{CORE}/secrets/my-token"] = _secret("my-token", "tok")
    auth = kuberay.dashboard_auth("chat", kind="RayService")
    assert fake_kube.calls()[-1] == ("GET", f"{CORE}/secrets/my-token")
    assert (auth.token, auth.address) == ("tok", "http://chat-abcde-head-svc.team.svc:8265")


def test_cluster_without_token_auth_reads_no_secret(fake_kube, kuberay):
    fake_kube.objects[f"{RAY}/rayclusters/open"] = _raycluster("open", {"mode": "disabled"})
    auth = kuberay.dashboard_auth("open", kind="RayCluster")
    assert auth.token is None and fake_kube.calls() == [("GET", f"{RAY}/rayclusters/open")]


def test_missing_token_secret_is_a_clear_error(fake_kube, kuberay):
    fake_kube.objects[f"{RAY}/rayclusters/c1"] = _raycluster("c1", {"mode": "token"})
    with pytest.raises(KubernetesError, match="auth token Secret 'c1' of RayCluster/c1 does not exist"):
        kuberay.dashboard_auth("c1", kind="RayCluster")


def test_rayjob_without_a_cluster_yet(fake_kube, kuberay):
    fake_kube.objects[f"{RAY}/rayjobs/nightly"] = {"kind": "RayJob", "metadata": {"name": "nightly"}}
    with pytest.raises(KubernetesError, match="has no Ray cluster yet"):
        kuberay.dashboard_auth("nightly", kind="RayJob")


def test_secret_name_follows_kuberay_check_name():
    from cluster.client import kuberay_check_name

    assert kuberay_check_name("chat-abcde") == "chat-abcde"
    long = "a" * 45 + "-" + "b" * 10
    assert kuberay_check_name(long) == long[-50:]
    assert kuberay_check_name("1abc") == "rabc"
    assert kuberay_check_name("-abc") == "rabc"


# -- failed staging Jobs ---------------------------------------------------------------------------
FAILED_JOB = {
    "failed": 4,
    "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
}


def test_apply_recreates_a_failed_staging_job(fake_kube, kuberay):
    spec = parse_spec(BATCH)
    kuberay.apply(spec)
    job = f"{JOBS}/stage-tiny-8950abfd"
    fake_kube.objects[job]["status"] = FAILED_JOB
    fake_kube.requests.clear()
    r = kuberay.apply(spec)
    assert fake_kube.calls() == [
        ("POST", f"{CORE}/configmaps"),
        ("PATCH", f"{CORE}/configmaps/nightly-spec"),
        ("POST", f"{CORE}/persistentvolumeclaims"),
        ("POST", JOBS),
        ("GET", job),
        ("DELETE", job),
        ("POST", JOBS),
        ("POST", f"{RAY}/rayjobs"),
        ("PATCH", f"{RAY}/rayjobs/nightly"),
    ]
    assert fake_kube.requests[5].body["propagationPolicy"] == "Background"
    expected = render(spec)[2]
    expected["metadata"]["namespace"] = NS
    assert fake_kube.requests[6].body == expected
    assert r.recreated == ["Job/stage-tiny-8950abfd"] and r.unchanged == [
        "PersistentVolumeClaim/raylane-weights"
    ]
    assert "status" not in fake_kube.objects[job]  # a fresh Job


@pytest.mark.parametrize(
    "status",
    [{"active": 1}, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}],
)
def test_running_or_done_staging_job_is_left_alone(fake_kube, kuberay, status):
    spec = parse_spec(BATCH)
    kuberay.apply(spec)
    job = f"{JOBS}/stage-tiny-8950abfd"
    fake_kube.objects[job]["status"] = status
    fake_kube.requests.clear()
    r = kuberay.apply(spec)
    assert ("DELETE", job) not in fake_kube.calls() and ("GET", job) in fake_kube.calls()
    assert r.recreated == [] and "Job/stage-tiny-8950abfd" in r.unchanged


# -- RBAC ------------------------------------------------------------------------------------------
def _verb(method: str, path: str) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) of one API request, as the API server's authorizer sees it."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":  # /api/v1/namespaces/NS/RESOURCE[/NAME[/SUB]]
        group, rest = "", parts[4:]
    else:  # /apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME[/SUB]]
        group, rest = parts[1], parts[5:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(
        method, "get" if named else "list"
    )
    return group, resource, verb


def _exercise_every_client_call(fake_kube, kuberay):
    """Each KubeRay method against the fake API server: every request raylane can make."""
    for raw in (BATCH, CRON, SERVE):
        kuberay.apply(parse_spec(raw))  # creates
        kuberay.apply(parse_spec(raw))  # patches; reads the staging Job
    fake_kube.objects[f"{JOBS}/stage-tiny-8950abfd"]["status"] = FAILED_JOB
    kuberay.apply(parse_spec(BATCH))  # deletes and recreates the failed staging Job
    fake_kube.objects[f"{RAY}/rayjobs/nightly"]["status"] = {"rayClusterName": "nightly-x7k2p"}
    fake_kube.objects[f"{RAY}/rayclusters/nightly-x7k2p"] = _raycluster("nightly-x7k2p", {"mode": "token"})
    fake_kube.objects[f"{CORE}/secrets/nightly-x7k2p"] = _secret("nightly-x7k2p", "t")
    kuberay.status("nightly")
    kuberay.status("nightly-x7k2p")  # looks through every kind
    kuberay.dashboard_auth("nightly")
    fake_kube.pods["job-name=nightly"] = [{"metadata": {"name": "sub", "namespace": NS}}]
    kuberay.logs("nightly")
    for name in ("nightly", "cron", "chat", "nightly-x7k2p"):
        kuberay.delete(name)


def test_role_covers_exactly_the_requests_the_client_makes(fake_kube, kuberay):
    from cluster.rbac import role_manifest

    _exercise_every_client_call(fake_kube, kuberay)
    used = {_verb(r.method, r.path) for r in fake_kube.requests}
    granted = {
        (group, resource, verb)
        for rule in role_manifest(NS)["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used == granted  # covers every call, and grants nothing the client never does
    assert ("", "secrets", "get") in used and ("ray.io", "rayclusters", "create") not in granted


def test_rbac_command_prints_role_and_binding(tmp_path):
    r = run_cli("rbac", "-n", "team", "--service-account", "ci", timeout=60)
    assert r.returncode == 0, r.stderr
    role, binding = list(yaml.safe_load_all(r.stdout))
    assert (role["kind"], role["metadata"]["namespace"]) == ("Role", "team")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "raylane"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ci", "namespace": "team"}]
    r = run_cli("rbac", "--no-secrets", timeout=60)
    role = next(yaml.safe_load_all(r.stdout))
    assert all("secrets" not in rule["resources"] for rule in role["rules"])


def test_shipped_rbac_file_matches_the_generator():
    from pathlib import Path

    from cluster.rbac import rbac_manifests

    shipped = Path(__file__).resolve().parents[2] / "cluster" / "rbac.yaml"
    assert list(yaml.safe_load_all(shipped.read_text())) == rbac_manifests("default")
