"""Rendering: every shape (and every example spec) to a KubeRay resource the v1 CRD accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster import crds
from cluster.render import render, serve_config_for
from runtime.specs import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

GPU = {
    "num_workers": 2,
    "cpus_per_worker": 8,
    "gpus_per_worker": 1,
    "memory_gb_per_worker": 64,
    "accelerator_type": "A100-80GB",
}
SPECS = {
    "Training": {
        "kind": "Training",
        "name": "pretrain",
        "data": {"path": "s3://b/train.parquet"},
        "resources": {**GPU, "num_workers": 4},
    },
    "FineTune": {
        "kind": "FineTune",
        "name": "ft",
        "base_model": "tiny",
        "data": {"path": "s3://b/chat.jsonl"},
        "resources": GPU,
    },
    "BatchInference": {
        "kind": "BatchInference",
        "name": "batch",
        "model": "tiny",
        "resources": GPU,
        "input": {"path": "s3://b/in.jsonl"},
        "output": {"path": "s3://b/out"},
    },
    "BatchInference-cron": {
        "kind": "BatchInference",
        "name": "nightly",
        "model": "tiny",
        "schedule": "0 2 * * *",
        "input": {"path": "s3://b/in.jsonl"},
        "output": {"path": "s3://b/out"},
    },
    "OnlineInference": {
        "kind": "OnlineInference",
        "name": "chat",
        "model": "tiny",
        "resources": {k: v for k, v in GPU.items() if k != "num_workers"},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
    },
    "Agent": {"kind": "Agent", "name": "helper"},
}
EXPECTED_KIND = {
    "Training": "RayJob",
    "FineTune": "RayJob",
    "BatchInference": "RayJob",
    "BatchInference-cron": "RayCronJob",
    "OnlineInference": "RayService",
    "Agent": "RayService",
}


def main_of(docs):
    return docs[-1]


def cluster_of(m):
    spec = m["spec"]
    return (
        spec.get("rayClusterSpec")
        or spec.get("rayClusterConfig")
        or (spec.get("jobTemplate") or {}).get("rayClusterSpec")
        or spec
    )


def pods_of(m):
    c = cluster_of(m)
    return [("head", c["headGroupSpec"])] + [(g["groupName"], g) for g in c["workerGroupSpecs"]]


@pytest.mark.parametrize("case", list(SPECS))
def test_each_shape_renders_a_crd_valid_resource(case):
    docs = render(parse_spec(SPECS[case]))
    m = main_of(docs)
    assert m["kind"] == EXPECTED_KIND[case] and m["apiVersion"] == "ray.io/v1"
    assert crds.schema_errors(m) == []
    assert crds.unknown_keys(m) == []
    # the head runs no workload; workers carry it
    head = cluster_of(m)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert cluster_of(m)["enableInTreeAutoscaling"] is True
    assert cluster_of(m)["autoscalerOptions"]["idleTimeoutSeconds"] == 60


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_spec_renders_crd_valid(path):
    docs = render(load_spec(path))
    m = main_of(docs)
    assert m["kind"] in ("RayJob", "RayCronJob", "RayService")
    assert crds.check_manifest(m) == []


def test_examples_cover_every_shape():
    kinds = {yaml.safe_load(p.read_text()).get("kind") for p in EXAMPLES}
    assert kinds == {"Training", "FineTune", "BatchInference", "OnlineInference", "Agent"}


def test_rayjob_entrypoint_runtime_env_and_lifecycle():
    spec = parse_spec(
        {
            **SPECS["BatchInference"],
            "storage": {"root": "s3://bucket/raylane"},
            "kubernetes": {
                "active_deadline_seconds": 7200,
                "backoff_limit": 2,
                "ttl_seconds_after_finished": 300,
                "working_dir": "s3://bucket/code/raylane.zip",
                "submission_mode": "HTTPMode",
            },
        }
    )
    docs = render(spec)
    job = main_of(docs)["spec"]
    assert job["entrypoint"] == "python -m jobs.batch --spec /etc/raylane/spec.yaml"
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env == {
        "env_vars": {"RAYLANE_STORAGE_ROOT": "s3://bucket/raylane"},
        "working_dir": "s3://bucket/code/raylane.zip",
    }
    assert (job["shutdownAfterJobFinishes"], job["ttlSecondsAfterFinished"]) == (True, 300)
    assert (job["backoffLimit"], job["activeDeadlineSeconds"], job["submissionMode"]) == (
        2,
        7200,
        "HTTPMode",
    )
    # the spec itself travels in a ConfigMap mounted where the entrypoint reads it
    cm = docs[0]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "batch-spec"
    embedded = parse_spec(yaml.safe_load(cm["data"]["spec.yaml"]))
    assert embedded.name == "batch" and embedded.input.path == "s3://b/in.jsonl"
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "raylane-spec", "mountPath": "/etc/raylane", "readOnly": True} in head[
        "containers"
    ][0]["volumeMounts"]


def test_gpu_groups_tolerations_and_accelerator_selector():
    m = main_of(render(parse_spec(SPECS["OnlineInference"])))
    groups = {g["groupName"]: g for g in cluster_of(m)["workerGroupSpecs"]}
    assert set(groups) == {"gpu-workers", "cpu-workers"}
    gpu_pod = groups["gpu-workers"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-80GB"}
    assert (groups["gpu-workers"]["minReplicas"], groups["gpu-workers"]["maxReplicas"]) == (1, 3)
    cpu_pod = groups["cpu-workers"]["template"]["spec"]
    assert (
        "tolerations" not in cpu_pod
        and "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    )


def test_env_secret_reaches_every_pod_and_the_stager():
    docs = render(
        parse_spec({**SPECS["OnlineInference"], "kubernetes": {"env_secret": "chat-keys"}})
    )
    for _, g in pods_of(main_of(docs)):
        assert g["template"]["spec"]["containers"][0]["envFrom"] == [
            {"secretRef": {"name": "chat-keys"}}
        ]
    stager = docs[2]["spec"]["template"]["spec"]["containers"][0]
    assert stager["envFrom"] == [{"secretRef": {"name": "chat-keys"}}]
    assert crds.check_manifest(main_of(docs)) == []


def test_training_group_is_sized_for_the_gang():
    m = main_of(render(parse_spec(SPECS["Training"])))
    g = cluster_of(m)["workerGroupSpecs"][0]
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (4, 4, 4)
    limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}


def test_cpu_only_spec_has_one_cpu_group_and_fractional_cpus():
    spec = parse_spec(
        {**SPECS["BatchInference"], "resources": {"num_workers": 3, "cpus_per_worker": 0.5}}
    )
    groups = cluster_of(main_of(render(spec)))["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu-workers"]
    assert groups[0]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    assert (groups[0]["minReplicas"], groups[0]["maxReplicas"]) == (0, 3)


@pytest.mark.parametrize(
    "system,expected",
    [
        ("kueue", {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high"}),
        (
            "volcano",
            {
                "ray.io/scheduler-name": "volcano",
                "volcano.sh/queue-name": "team-a",
                "ray.io/priority-class-name": "high",
            },
        ),
        (
            "yunikorn",
            {
                "ray.io/scheduler-name": "yunikorn",
                "ray.io/gang-scheduling-enabled": "true",
                "yunikorn.apache.org/app-id": "batch",
                "yunikorn.apache.org/queue": "team-a",
            },
        ),
    ],
)
def test_queue_labels(system, expected):
    spec = parse_spec(
        {
            **SPECS["BatchInference"],
            "queue": {"system": system, "name": "team-a"},
            "priority": "high",
        }
    )
    m = main_of(render(spec))
    labels = m["metadata"]["labels"]
    assert {k: labels[k] for k in expected} == expected
    assert m["spec"].get("suspend", False) is (system == "kueue")  # Kueue admits by un-suspending
    for _, g in pods_of(m):
        assert g["template"]["spec"]["priorityClassName"] == "high"
    assert crds.check_manifest(m) == []


@pytest.mark.parametrize("case", ["BatchInference", "OnlineInference", "FineTune"])
def test_weights_staged_once_and_mounted_read_only(case):
    docs = render(parse_spec(SPECS[case]))
    kinds = [d["kind"] for d in docs]
    assert kinds[:3] == ["ConfigMap", "PersistentVolumeClaim", "Job"]
    pvc, stage = docs[1], docs[2]
    assert "ReadOnlyMany" in pvc["spec"]["accessModes"]
    cmd = stage["spec"]["template"]["spec"]["containers"][0]["command"]
    assert (
        cmd[:3] == ["python", "-m", "jobs.stage_weights"]
        and cmd[cmd.index("--model") + 1] == "tiny"
    )
    dest = cmd[cmd.index("--dest") + 1]
    for _, g in pods_of(main_of(docs)):
        pod = g["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v["name"] == "raylane-weights")
        assert vol["persistentVolumeClaim"] == {"claimName": "raylane-weights", "readOnly": True}
        mount = next(
            m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "raylane-weights"
        )
        assert mount["readOnly"] is True
        assert pod["initContainers"][0]["name"] == "wait-for-weights"
    # the run reads the staged copy, not the original reference; the image holds no weights
    embedded = yaml.safe_load(docs[0]["data"]["spec.yaml"])
    field = {"FineTune": "base_model"}.get(case, "model")
    assert embedded[field] == dest and dest.startswith("/mnt/weights/tiny-")


def test_weights_staged_by_head_init_container():
    spec = parse_spec(
        {**SPECS["BatchInference"], "kubernetes": {"weights": {"stage": "init-container"}}}
    )
    docs = render(spec)
    assert [d["kind"] for d in docs] == ["ConfigMap", "PersistentVolumeClaim", "RayJob"]
    c = cluster_of(main_of(docs))
    head = c["headGroupSpec"]["template"]["spec"]
    assert head["initContainers"][0]["name"] == "stage-weights"
    assert next(v for v in head["volumes"] if v["name"] == "raylane-weights")[
        "persistentVolumeClaim"
    ] == {
        "claimName": "raylane-weights"
    }  # the head writes; its main container still mounts read-only
    for g in c["workerGroupSpecs"]:
        assert g["template"]["spec"]["initContainers"][0]["name"] == "wait-for-weights"


def test_training_has_no_weight_cache():
    assert [d["kind"] for d in render(parse_spec(SPECS["Training"]))] == ["ConfigMap", "RayJob"]


@pytest.mark.parametrize("case", ["OnlineInference", "Agent"])
def test_rayservice_serve_config_is_what_serve_deploy_accepts(case):
    from ray.serve.schema import ServeDeploySchema

    spec = parse_spec(SPECS[case])
    docs = render(spec)
    m = main_of(docs)
    config = yaml.safe_load(m["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what `serve deploy` validates the file with
    embedded = parse_spec(yaml.safe_load(docs[0]["data"]["spec.yaml"]))
    assert config == serve_config_for(
        embedded
    )  # exactly the builder's output for the spec the cluster runs
    assert m["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    ports = {
        p["name"]: p["containerPort"]
        for p in cluster_of(m)["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["serve"] == config["http_options"]["port"]
    # Every node's Serve puts HAProxy in front of the replicas (the direct-streaming path), which
    # re-sends a request its replica dropped before answering to another replica.
    cluster = cluster_of(m)
    pods = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response 503"


def test_raycronjob_carries_the_schedule_and_a_full_job_template():
    m = main_of(
        render(parse_spec({**SPECS["BatchInference-cron"], "kubernetes": {"time_zone": "Etc/UTC"}}))
    )
    assert (m["spec"]["schedule"], m["spec"]["timeZone"]) == ("0 2 * * *", "Etc/UTC")
    assert m["spec"]["jobTemplate"]["entrypoint"].startswith("python -m jobs.batch --spec ")
    assert m["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] is True


def test_standalone_raycluster_for_submit():
    docs = render(parse_spec(SPECS["BatchInference"]), as_cluster=True)
    m = main_of(docs)
    assert m["kind"] == "RayCluster"
    assert crds.check_manifest(m) == []


def test_cluster_selector_runs_on_an_existing_cluster():
    import base64

    spec = parse_spec(
        {
            **SPECS["BatchInference"],
            "kubernetes": {
                "cluster_selector": "shared",
                "ttl_seconds_after_finished": 0,
                "shutdown_after_job_finishes": False,
            },
        }
    )
    docs = render(spec)
    assert [d["kind"] for d in docs] == [
        "RayJob"
    ]  # no ConfigMap or PVC: that cluster exists already
    job = docs[0]["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": "shared"} and "rayClusterSpec" not in job
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert parse_spec(yaml.safe_load(base64.b64decode(env["RAYLANE_SPEC_B64"]))).name == "batch"
    assert "python -m jobs.batch --spec /tmp/raylane-batch.yaml" in job["entrypoint"]


def test_undeclared_keys_are_caught():
    m = main_of(render(parse_spec(SPECS["Training"])))
    m["spec"]["shutdownAfterJobFinish"] = True  # a typo an API server would silently drop
    m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert crds.unknown_keys(m) == [
        "spec.rayClusterSpec.workerGroupSpecs[0].minReplica",
        "spec.shutdownAfterJobFinish",
    ] or sorted(crds.unknown_keys(m)) == sorted(
        ["spec.shutdownAfterJobFinish", "spec.rayClusterSpec.workerGroupSpecs[0].minReplica"]
    )
    m["spec"]["backoffLimit"] = "three"
    assert any("backoffLimit" in e for e in crds.schema_errors(m))


def test_cli_render_writes_yaml(tmp_path):
    from tests.conftest import run_cli

    spec_file = tmp_path / "chat.yaml"
    spec_file.write_text(yaml.safe_dump(SPECS["OnlineInference"]))
    out = tmp_path / "k8s"
    r = run_cli("render", str(spec_file), "-o", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.yaml"))
    assert [yaml.safe_load(f.read_text())["kind"] for f in files] == [
        "ConfigMap",
        "PersistentVolumeClaim",
        "Job",
        "RayService",
    ]
    r = run_cli("render", str(spec_file), "--serve-config", timeout=120)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout) == serve_config_for(parse_spec(SPECS["OnlineInference"]))
    r = run_cli("render", str(spec_file), timeout=120)
    assert [d["kind"] for d in yaml.safe_load_all(r.stdout)][-1] == "RayService"


def test_render_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, yaml; from runtime.specs import parse_spec; from cluster.render import render;"
        f"render(parse_spec({SPECS['BatchInference']!r}));"
        "print([m for m in ('torch','vllm','transformers','kubernetes','ray') if m in sys.modules])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_quickstart_stage_renders_every_example(tmp_path):
    from cluster.render import quickstart_stage
    from runtime.quickstart import QuickstartContext

    r = quickstart_stage(QuickstartContext(workdir=tmp_path))
    expected = {}
    for p in EXAMPLES:
        d = yaml.safe_load(p.read_text())
        expected[p.name] = "RayCronJob" if d.get("schedule") else EXPECTED_KIND[d["kind"]]
    assert r["rendered"] == expected and set(expected.values()) >= {"RayJob", "RayService"}
    assert len(list((tmp_path / "kuberay").rglob("*.yaml"))) >= 5


def test_stage_weights_is_idempotent_and_atomic(tmp_path):
    from cluster.weights import MARKER
    from jobs.stage_weights import stage

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"w" * 100)
    dest = tmp_path / "pvc" / "model-1234"
    dest.parent.mkdir()
    stage(str(src), dest)
    assert (dest / MARKER).read_text().strip() == str(src)
    assert (dest / "model.safetensors").read_bytes() == b"w" * 100
    assert not (tmp_path / "pvc" / "model-1234.partial").exists()
    (src / "model.safetensors").write_bytes(b"changed")
    stage(str(src), dest)  # staged once: a second run finds the marker and copies nothing
    assert (dest / "model.safetensors").read_bytes() == b"w" * 100
