"""Storage that outlives the cluster (issue 13 item 6): a rendered run keeps its checkpoints,
outputs, registry and sessions on shared storage, or `raylane apply` refuses it, naming the field."""

from __future__ import annotations

import pytest
import yaml

from cluster.render import render
from cluster.storage import check_storage, storage_problems
from runtime.errors import SpecError
from runtime.specs import parse_spec
from tests.conftest import run_cli

BATCH = {"kind": "BatchInference", "name": "nightly", "model": "tiny", "input": {"path": "s3://b/in.jsonl"}, "output": {},
         "storage": {"root": "/home/me/.raylane"}}
SHARED = {"storage": {"claim_name": "team-share", "size_gb": 50, "storage_class": "efs"}}


def ray_pods(manifest):
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])
    ]


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_a_pod_local_root_is_named_with_its_fix_and_apply_sends_nothing(fake_kube, kuberay):
    spec = parse_spec(BATCH)
    (problem,) = storage_problems(spec)
    assert problem.path == "storage.root" and "/home/me/.raylane" in problem.message
    assert "s3://" in problem.message and "kubernetes.storage" in problem.message
    with pytest.raises(SpecError) as e:
        kuberay.apply(spec)
    assert e.value.exit_code == 2 and "ephemeral_storage" in str(e.value)
    assert fake_kube.requests == []  # refused before a single request
    # A throwaway run says so, and goes through.
    check_storage(parse_spec({**BATCH, "kubernetes": {"ephemeral_storage": True}}))


def test_shared_volume_is_every_pods_root_and_the_local_root_stays_local():
    spec = parse_spec({**BATCH, "kubernetes": SHARED})
    assert storage_problems(spec) == [] and spec.storage.root == "/home/me/.raylane"
    docs = render(spec)
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "team-share"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "efs"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    job = docs[-1]
    for pod in ray_pods(job):
        assert {"name": "raylane-storage", "persistentVolumeClaim": {"claimName": "team-share"}} in pod["volumes"]
        (c,) = pod["containers"]
        assert {"name": "raylane-storage", "mountPath": "/mnt/raylane"} in c["volumeMounts"]  # read-write
        assert env_of(c)["RAYLANE_STORAGE_ROOT"] == "/mnt/raylane"
    assert job["spec"]["runtimeEnvYAML"] and "/mnt/raylane" in job["spec"]["runtimeEnvYAML"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert yaml.safe_load(cm["data"]["spec.yaml"])["storage"]["root"] == "/mnt/raylane"
    # The staging Job reads the registry from the same storage.
    (stage,) = [d for d in docs if d["kind"] == "Job"]
    pod = stage["spec"]["template"]["spec"]
    assert {"name": "raylane-storage", "persistentVolumeClaim": {"claimName": "team-share"}} in pod["volumes"]
    assert pod["containers"][0]["command"][-1] == "/mnt/raylane"


def test_an_existing_claim_is_mounted_not_rendered():
    docs = render(parse_spec({**BATCH, "kubernetes": {"storage": {"claim_name": "nfs", "mount_path": "/data"}}}))
    assert not any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "nfs" for d in docs)
    (c,) = ray_pods(docs[-1])[0]["containers"]
    assert env_of(c)["RAYLANE_STORAGE_ROOT"] == "/data"


def test_the_registry_must_be_reachable_from_the_pods():
    train = {"kind": "Training", "name": "pretrain", "data": {"path": "s3://b/train.parquet"},
             "storage": {"root": "s3://b/raylane"}}
    (problem,) = storage_problems(parse_spec(train))  # an s3 root: the embedded registry is pod-local SQLite
    assert problem.path == "kubernetes.mlflow_tracking_uri"
    spec = parse_spec({**train, "kubernetes": {"mlflow_tracking_uri": "http://mlflow.ml:5000"}})
    assert storage_problems(spec) == []
    for pod in ray_pods(render(spec)[-1]):
        assert env_of(pod["containers"][0])["MLFLOW_TRACKING_URI"] == "http://mlflow.ml:5000"
    # With an s3 root and a shared volume, the embedded registry moves onto the volume.
    shared = parse_spec({**train, "kubernetes": SHARED})
    assert storage_problems(shared) == []
    (c,) = ray_pods(render(shared)[-1])[0]["containers"]
    assert env_of(c)["RAYLANE_REGISTRY_ROOT"] == "/mnt/raylane" and env_of(c)["RAYLANE_STORAGE_ROOT"] == "s3://b/raylane"
    # A served adapter named by a registry alias counts too; a URI with credentials never renders.
    serve = {"kind": "OnlineInference", "name": "chat", "model": "tiny", "storage": {"root": "s3://b/r"},
             "adapters": {"bot": "models:/bot@champion"}, "kubernetes": {"weights": {"enabled": False}}}
    assert [p.path for p in storage_problems(parse_spec(serve))] == ["kubernetes.mlflow_tracking_uri"]
    with pytest.raises(SpecError, match="kubernetes.mlflow_tracking_uri: holds credentials"):
        parse_spec({**train, "kubernetes": {"mlflow_tracking_uri": "https://me:hunter2@mlflow.example"}})


def test_agent_sessions_live_where_every_node_reaches_them():
    agent = {"kind": "Agent", "name": "helper", "storage": {"root": "s3://b/r"}}
    (problem,) = storage_problems(parse_spec(agent))
    assert problem.path == "sessions" and "redis" in problem.message
    assert storage_problems(parse_spec({**agent, "sessions": {"backend": "redis", "url": "redis://r:6379/0"}})) == []
    assert storage_problems(parse_spec({**agent, "kubernetes": SHARED})) == []
    outside = {**agent, "kubernetes": SHARED, "sessions": {"backend": "sqlite", "url": "/tmp/s.db"}}
    assert [p.path for p in storage_problems(parse_spec(outside))] == ["sessions"]
    # A served model with no durable state needs nothing shared.
    assert storage_problems(parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny"})) == []


def test_cli_render_warns_and_apply_refuses(tmp_path):
    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(yaml.safe_dump(BATCH))
    r = run_cli("render", str(spec_file), "-o", str(tmp_path / "out"))
    assert r.returncode == 0 and "warning: storage.root" in r.stderr
    r = run_cli("apply", str(spec_file), "--kubeconfig", str(tmp_path / "none"))
    assert r.returncode == 2 and "storage.root" in r.stderr and "Traceback" not in r.stderr


def test_a_rendered_agent_with_pod_local_sqlite_sessions_is_named_at_render_and_refused_at_apply(tmp_path):
    """Issue 13 item 5: a RayService whose SQLite sessions would sit in one pod (each replica's node
    its own store, all lost with the cluster); `raylane run` refuses the same at start
    (runtime.shared_paths, tests/test_shared_paths.py)."""
    spec_file = tmp_path / "helper.yaml"
    spec_file.write_text(yaml.safe_dump({"kind": "Agent", "name": "helper", "storage": {"root": "s3://b/r"},
                                         "sessions": {"backend": "sqlite"}}))
    r = run_cli("render", str(spec_file), "-o", str(tmp_path / "out"))
    assert r.returncode == 0 and "warning: sessions: the SQLite session store" in r.stderr and "redis://" in r.stderr
    r = run_cli("apply", str(spec_file), "--kubeconfig", str(tmp_path / "none"))
    assert r.returncode == 2 and "sessions: the SQLite session store" in r.stderr and "Traceback" not in r.stderr
