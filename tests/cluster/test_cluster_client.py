"""apply / status / logs / delete: the real ``kubernetes`` client against a fake API server that
records every request; responses are the API server's (Status objects, 409 on create conflicts)
and KubeRay's status fields as the operator writes them."""

from __future__ import annotations

import json

import pytest
import yaml

from cluster.render import render
from runtime.errors import KubernetesError, ManifestInvalid
from runtime.specs import parse_spec
from tests.conftest import run_cli

NS = "team"
BATCH = {
    "kind": "BatchInference",
    "name": "nightly",
    "model": "tiny",
    "input": {"path": "s3://b/in.jsonl"},
    "output": {"path": "s3://b/out"},
    "storage": {"root": "s3://b/raylane"},  # on the cluster, not inside the pods (cluster.storage)
}
RAYJOB = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
CM = f"/api/v1/namespaces/{NS}/configmaps"
PVC = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"

# Status progressions as KubeRay v1.7 writes them (status.jobDeploymentStatus / status.jobStatus).
INITIALIZING = {"jobDeploymentStatus": "Initializing", "rayClusterName": "nightly-x7k2p"}
RUNNING = {
    "jobDeploymentStatus": "Running",
    "jobStatus": "RUNNING",
    "jobId": "nightly-abcde",
    "rayClusterName": "nightly-x7k2p",
    "dashboardURL": "nightly-x7k2p-head-svc.team.svc.cluster.local:8265",
}
SUCCEEDED = {
    **RUNNING,
    "jobDeploymentStatus": "Complete",
    "jobStatus": "SUCCEEDED",
    "succeeded": 1,
    "message": "Job finished successfully.",
}
FAILED = {
    **RUNNING,
    "jobDeploymentStatus": "Complete",
    "jobStatus": "FAILED",
    "failed": 1,
    "message": "Job entrypoint command failed with exit code 1",
}
COMPLETE_NO_JOB_STATUS = {"jobDeploymentStatus": "Complete", "rayClusterName": "nightly-x7k2p"}


def batch_spec(**extra):
    return parse_spec({**BATCH, **extra})


def test_apply_creates_every_object_with_exact_requests(fake_kube, kuberay):
    r = kuberay.apply(batch_spec())
    assert kuberay.namespace == NS  # from the kubeconfig context
    assert fake_kube.calls() == [("POST", CM), ("POST", PVC), ("POST", JOBS), ("POST", RAYJOB)]
    expected = render(batch_spec())
    for req, doc in zip(fake_kube.requests, expected):
        doc["metadata"]["namespace"] = NS
        assert req.body == doc
        assert req.content_type in (None, "application/json")  # the client sends JSON bodies
    assert (r.kind, r.name, r.namespace, r.ok) == ("RayJob", "nightly", NS, True)
    assert r.created == [
        "ConfigMap/nightly-spec",
        "PersistentVolumeClaim/raylane-weights",
        "Job/stage-tiny-8950abfd",
        "RayJob/nightly",
    ]


def test_apply_again_patches_the_run_and_keeps_the_shared_cache(fake_kube, kuberay):
    kuberay.apply(batch_spec())
    fake_kube.requests.clear()
    r = kuberay.apply(batch_spec(description="second"))
    assert fake_kube.calls() == [
        ("POST", CM),
        ("PATCH", f"{CM}/nightly-spec"),
        ("POST", PVC),
        ("POST", JOBS),
        ("GET", f"{JOBS}/stage-tiny-8950abfd"),  # exists: recreated only if it failed
        ("POST", RAYJOB),
        ("PATCH", f"{RAYJOB}/nightly"),
    ]
    patches = [q for q in fake_kube.requests if q.method == "PATCH"]
    assert {q.content_type for q in patches} == {"application/merge-patch+json"}
    assert "description: second" in fake_kube.objects[f"{CM}/nightly-spec"]["data"]["spec.yaml"]
    assert (r.created, r.unchanged) == (
        [],
        ["PersistentVolumeClaim/raylane-weights", "Job/stage-tiny-8950abfd"],
    )
    assert r.patched == ["ConfigMap/nightly-spec", "RayJob/nightly"]


def test_invalid_spec_sends_nothing(fake_kube, kuberay):
    with pytest.raises(ManifestInvalid):
        kuberay.apply(batch_spec(name="n" * 48))
    assert fake_kube.requests == []


def test_wait_succeeds_only_on_job_status_succeeded(fake_kube, kuberay):
    fake_kube.status_script[f"{RAYJOB}/nightly"] = [INITIALIZING, RUNNING, SUCCEEDED]
    r = kuberay.apply(batch_spec(), wait=True, poll_s=0.01, timeout_s=30)
    assert r.ok and r.status.state == "SUCCEEDED" and r.status.details["jobId"] == "nightly-abcde"
    gets = [c for c in fake_kube.calls() if c[0] == "GET"]
    assert gets == [("GET", f"{RAYJOB}/nightly")] * 3


@pytest.mark.parametrize("final,state", [(FAILED, "FAILED"), (COMPLETE_NO_JOB_STATUS, "Complete")])
def test_wait_reports_failure(fake_kube, kuberay, final, state):
    fake_kube.status_script[f"{RAYJOB}/nightly"] = [RUNNING, final]
    r = kuberay.apply(batch_spec(), wait=True, poll_s=0.01, timeout_s=30)
    assert r.ok is False and r.status.ok is False and r.status.state == state


def test_wait_times_out_with_last_state(fake_kube, kuberay):
    fake_kube.status_script[f"{RAYJOB}/nightly"] = [RUNNING]
    from runtime.errors import RaylaneError

    with pytest.raises(RaylaneError, match="still RUNNING after"):
        kuberay.apply(batch_spec(), wait=True, poll_s=0.01, timeout_s=0.2)


def test_status_finds_the_kind(fake_kube, kuberay):
    svc = render(parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny"}))[-1]
    svc["metadata"]["namespace"] = NS
    path = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/chat"
    fake_kube.objects[path] = {
        **svc,
        "status": {
            "serviceStatus": "Running",
            "numServeEndpoints": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "NonZeroServeEndpoints",
                    "message": "Number of serve endpoints is greater than 0",
                }
            ],
            "activeServiceStatus": {
                "rayClusterName": "chat-abcde",
                "applicationStatuses": {"chat": {"status": "RUNNING"}},
            },
        },
    }
    st = kuberay.status("chat")
    assert fake_kube.calls() == [("GET", f"{RAYJOB}/chat"), ("GET", path)]
    assert (st.kind, st.state, st.ok, st.details["applications"]) == (
        "RayService",
        "Ready",
        True,
        {"chat": "RUNNING"},
    )


def test_api_errors_are_shown_plainly(fake_kube, kuberay):
    fake_kube.fail[("POST", CM)] = (
        403,
        'configmaps is forbidden: User "me" cannot create resource '
        '"configmaps" in API group "" in the namespace "team"',
    )
    with pytest.raises(KubernetesError) as e:
        kuberay.apply(batch_spec())
    assert str(e.value).startswith(
        "Kubernetes API: create ConfigMap/nightly-spec failed (403): configmaps is "
        'forbidden: User "me" cannot create'
    )
    assert "RBAC" in e.value.hint


def test_missing_object(fake_kube, kuberay):
    with pytest.raises(
        KubernetesError, match="no RayJob or RayService or RayCronJob or RayCluster named 'ghost'"
    ):
        kuberay.status("ghost")


def test_delete_removes_object_and_spec_configmap(fake_kube, kuberay):
    kuberay.apply(batch_spec())
    fake_kube.requests.clear()
    r = kuberay.delete("nightly")
    assert fake_kube.calls() == [
        ("GET", f"{RAYJOB}/nightly"),
        ("DELETE", f"{RAYJOB}/nightly"),
        ("DELETE", f"{CM}/nightly-spec"),
    ]
    assert fake_kube.requests[1].body["propagationPolicy"] == "Background"
    assert r["deleted"] == ["RayJob/nightly", "ConfigMap/nightly-spec"]
    assert f"{PVC}/raylane-weights" in fake_kube.objects  # the shared cache stays


def test_logs_of_the_submitter_pod(fake_kube, kuberay):
    kuberay.apply(batch_spec())
    fake_kube.objects[f"{RAYJOB}/nightly"]["status"] = RUNNING
    fake_kube.pods["job-name=nightly"] = [{"metadata": {"name": "nightly-sub-1", "namespace": NS}}]
    fake_kube.pod_logs["nightly-sub-1"] = "rows_out: 1000\n"
    fake_kube.requests.clear()
    assert kuberay.logs("nightly") == "rows_out: 1000\n"
    assert fake_kube.calls() == [
        ("GET", f"{RAYJOB}/nightly"),
        ("GET", f"/api/v1/namespaces/{NS}/pods"),
        ("GET", f"/api/v1/namespaces/{NS}/pods/nightly-sub-1/log"),
    ]
    assert fake_kube.requests[1].query["labelSelector"] == ["job-name=nightly"]


def test_cli_apply_status_logs_delete(fake_kube, tmp_path):
    env = {"KUBECONFIG": str(fake_kube.kubeconfig(tmp_path / "kubeconfig"))}
    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(yaml.safe_dump(BATCH))
    fake_kube.status_script[f"{RAYJOB}/nightly"] = [RUNNING, FAILED]
    r = run_cli("apply", str(spec_file), "--wait", "--json", env=env, timeout=120)
    assert r.returncode == 1, r.stderr  # the job FAILED: apply --wait says so in its exit code
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["status"]["state"] == "FAILED"
    r = run_cli("status", "nightly", "--json", env=env, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout)["state"] == "FAILED"
    fake_kube.pods["job-name=nightly"] = [{"metadata": {"name": "sub", "namespace": NS}}]
    fake_kube.pod_logs["sub"] = "Traceback: boom\n"
    r = run_cli("logs", "nightly", env=env, timeout=120)
    assert r.returncode == 0 and r.stdout == "Traceback: boom\n"
    r = run_cli("delete", "nightly", env=env, timeout=120)
    assert (
        r.returncode == 0 and "deleted RayJob/nightly, ConfigMap/nightly-spec in team" in r.stdout
    )
    fake_kube.fail[("GET", f"{RAYJOB}/nightly")] = (403, 'rayjobs.ray.io "nightly" is forbidden')
    r = run_cli("status", "nightly", env=env, timeout=120)
    assert r.returncode == 6 and "Traceback" not in r.stderr
    assert (
        'error: Kubernetes API: get RayJob/nightly failed (403): rayjobs.ray.io "nightly" is forbidden'
        in r.stderr
    )
