"""``raylane submit`` for real: a ``ray start --head`` cluster of its own (own temp dir, free ports,
token auth on as Ray 2.60 sets it), one job that succeeds and one that fails."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.ray_head import VENV_BIN
from tests.ray_head import ray_head as start_head

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    with start_head(str(tmp_path_factory.mktemp("rayhead"))) as head:
        yield head.dashboard_url


def _train_spec(tmp_path: Path, name: str, data: str) -> Path:
    spec = {
        "kind": "Training",
        "name": name,
        "data": {"path": data, "max_seq_len": 32},
        "train": {"steps": 4, "batch_size": 2, "checkpoint_every_n_steps": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"root": str(tmp_path / "storage")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_success_and_failure(ray_head, tmp_path):
    # Succeeds: a real Ray Train run; the relative data path resolves inside the uploaded project.
    ok = run_cli(
        "submit",
        str(_train_spec(tmp_path, "submit-ok", "examples/data/train.jsonl")),
        "--address",
        ray_head,
        "--json",
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-4000:]
    result = json.loads(ok.stdout)
    assert result["status"] == "SUCCEEDED" and result["ok"] is True
    assert result["entrypoint"] == "python -m jobs.train --spec raylane-spec-submit-ok.yaml"
    assert "Running entrypoint for job" in ok.stderr  # the job's own log lines were followed
    assert any((tmp_path / "storage").rglob("*")), "the job wrote nothing under its storage root"

    # Fails: the data file does not exist; the exit code and status say so, the logs show why.
    bad = run_cli(
        "submit",
        str(_train_spec(tmp_path, "submit-bad", "examples/data/missing.jsonl")),
        "--address",
        ray_head,
        "--json",
        timeout=600,
    )
    assert bad.returncode == 1, bad.stderr[-4000:]
    result = json.loads(bad.stdout)
    assert result["status"] == "FAILED" and result["ok"] is False
    assert "missing.jsonl" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_the_finetune_example(ray_head, tmp_path):
    """The command examples/finetune.yaml documents, run with Ray's own CLI from the project root:
    ``ray job submit --working-dir . -- python -m jobs.finetune --spec examples/finetune.yaml``."""
    from runtime.registry import Registry

    storage = tmp_path / "storage"
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"env_vars": {"RAYLANE_STORAGE_ROOT": str(storage)}}),
           "--", "python", "-m", "jobs.finetune", "--spec", "examples/finetune.yaml"]
    # The head runs with Ray 2.60's token auth; the suite's in-process clusters turn it off.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=840, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout.lower(), r.stdout[-2000:]
    # The job's result JSON, as the job printed it (ray job submit follows the job's logs).
    lines = r.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "{")
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "}")
    result = json.loads("\n".join(lines[start:end + 1]))
    assert result["final_step"] == result["total_steps"] == 40 and result["restarts"] == 0
    assert result["registry"]["name"] == "support-lora" and result["registry"]["alias"] == "champion"
    # Everything landed under the storage root the job was given, not in the uploaded working dir.
    assert Path(result["model_dir"]).is_relative_to(storage)
    assert (Path(result["model_dir"]) / "adapter_config.json").is_file()
    assert [v.aliases for v in Registry(str(storage)).list("support-lora")] == [["champion"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_without_token_is_a_clear_error(ray_head, tmp_path):
    env = {
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"),
        "RAY_AUTH_TOKEN": "",
        "HOME": str(tmp_path),
    }
    r = run_cli(
        "submit",
        str(_train_spec(tmp_path, "no-token", "examples/data/train.jsonl")),
        "--address",
        ray_head,
        env=env,
        timeout=240,
    )
    assert r.returncode == 1
    assert "error: the Ray cluster at" in r.stderr and "RAY_AUTH_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr


def test_working_dir_leaves_venv_git_and_large_files_behind(tmp_path):
    from runtime.submit import ALWAYS_EXCLUDED, _compose_working_dir

    project = tmp_path / "proj"
    (project / "jobs").mkdir(parents=True)
    (project / "jobs" / "x.py").write_text("print(1)\n")
    (project / ".venv" / "lib").mkdir(parents=True)
    (project / ".git").mkdir()
    (project / "data").mkdir()
    (project / "data" / "big.bin").write_bytes(b"\0" * 2_000_000)
    (project / "data" / "small.txt").write_text("ok")
    large = _compose_working_dir(project, tmp_path / "wd", max_file_mb=1)
    assert large == ["data/big.bin"]
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["data", "jobs"]
    assert ".venv" in ALWAYS_EXCLUDED and ".git" in ALWAYS_EXCLUDED


def test_submit_needs_an_address(tmp_path, monkeypatch):
    from runtime.errors import UsageError
    from runtime.submit import dashboard_url

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(UsageError, match="no Ray cluster to submit to"):
        dashboard_url(None)
    assert dashboard_url("10.0.0.5:8265") == "http://10.0.0.5:8265"
    with pytest.raises(UsageError, match="Ray Client address"):
        dashboard_url("ray://10.0.0.5:10001")


def test_services_are_not_jobs():
    from runtime.errors import RaylaneError
    from runtime.submit import job_module

    with pytest.raises(RaylaneError, match="not Ray jobs") as e:
        job_module("OnlineInference")
    assert "raylane apply" in e.value.hint


def _project_with_secrets(tmp_path: Path) -> Path:
    project = tmp_path / "proj"
    for d in ("jobs", "data", "conf", "scratch", "sub/cache"):
        (project / d).mkdir(parents=True)
    files = {
        "jobs/x.py": "print(1)\n",
        "jobs/keys.py": "KEYS = []\n",  # code named like a keys file is still code
        "data/small.txt": "ok",
        ".env": "AWS_SECRET_ACCESS_KEY=x\n",
        ".env.prod": "TOKEN=x\n",
        "conf/server.pem": "-----BEGIN PRIVATE KEY-----\n",
        "conf/api-keys": "sk-1\n",
        "conf/keys.txt": "sk-2\n",
        "conf/settings.yaml": "a: 1\n",
        "scratch/out.log": "x",
        "notes.tmp": "x",
        "sub/cache/blob": "x",
        "sub/keep.txt": "x",
        ".gitignore": "scratch/\n*.tmp\n",
        "sub/.gitignore": "cache/\n",
    }
    for rel, text in files.items():
        (project / rel).write_text(text)
    return project


def test_credentials_and_gitignored_files_stay_behind(tmp_path):
    from runtime.submit import left_behind

    secrets, ignored = left_behind(_project_with_secrets(tmp_path))
    assert secrets == [".env", ".env.prod", "conf/api-keys", "conf/keys.txt", "conf/server.pem"]
    assert ignored == ["notes.tmp", "scratch", "sub/cache"]


def test_ray_packs_exactly_what_submit_means_to_upload(tmp_path):
    """The working_dir zip Ray itself builds from the composed folder and submit's excludes."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from runtime.submit import ALWAYS_EXCLUDED, _compose_working_dir, left_behind

    project = _project_with_secrets(tmp_path)
    (project / ".venv").mkdir()
    (project / ".venv" / "x").write_text("x")
    secrets, ignored = left_behind(project)
    _compose_working_dir(project, tmp_path / "wd", max_file_mb=10)
    excludes = ALWAYS_EXCLUDED + [f"/{f}" for f in secrets + ignored]
    zpath = tmp_path / "pkg.zip"
    create_package(str(tmp_path / "wd"), zpath, include_gitignore=True, excludes=excludes)
    files = sorted(n for n in zipfile.ZipFile(zpath).namelist() if not n.endswith("/"))
    assert files == [
        ".gitignore",
        "conf/settings.yaml",
        "data/small.txt",
        "jobs/keys.py",
        "jobs/x.py",
        "sub/.gitignore",
        "sub/keep.txt",
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_to_a_kuberay_cluster_sends_the_token_from_its_secret(ray_head, tmp_path):
    """``raylane submit --cluster``: the token comes only from KubeRay's Secret (read through the
    Kubernetes API) and the real Ray head, with token auth on, accepts the job; a wrong token in
    the Secret is refused."""
    import base64

    from conftest import FakeKube

    from runtime.submit import auth_headers

    # The head's token, as Ray resolved it when the head started (env, else the token file).
    token = auth_headers()["Authorization"].removeprefix("Bearer ")
    fake = FakeKube()
    try:
        ns = "team"
        fake.objects[f"/apis/ray.io/v1/namespaces/{ns}/rayclusters/lab"] = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": "lab", "namespace": ns},
            "spec": {"authOptions": {"mode": "token"}},
            "status": {"state": "ready"},
        }

        def secret(value: str) -> None:
            fake.objects[f"/api/v1/namespaces/{ns}/secrets/lab"] = {
                "kind": "Secret",
                "metadata": {"name": "lab", "namespace": ns},
                "data": {"auth_token": base64.b64encode(value.encode()).decode()},
            }

        env = {
            "KUBECONFIG": str(fake.kubeconfig(tmp_path / "kubeconfig")),
            "RAY_AUTH_TOKEN": "",
            "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"),
            "HOME": str(tmp_path),
        }
        spec = _train_spec(tmp_path, "via-secret", "examples/data/train.jsonl")
        args = ["submit", str(spec), "--cluster", "lab", "--address", ray_head, "--no-follow", "--json"]
        secret(token)
        ok = run_cli(*args, env=env, timeout=240)
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert json.loads(ok.stdout)["status"] in ("PENDING", "RUNNING", "SUCCEEDED")
        assert ("GET", f"/api/v1/namespaces/{ns}/secrets/lab") in fake.calls()

        secret("not-the-token")
        bad = run_cli(*args, env=env, timeout=240)
        assert bad.returncode == 1
        assert "refused the token" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        fake.close()
