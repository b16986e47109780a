"""The weight cache follows the registry: ``models:/NAME@ALIAS`` is resolved at render time against
a real MLflow registry (SQLite), so a promotion gives a new cache folder and staging Job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.render import render
from runtime.specs import parse_spec


def _spec(root: Path, model: str = "models:/support-bot@champion"):
    return parse_spec(
        {
            "kind": "OnlineInference",
            "name": "chat",
            "model": model,
            "storage": {"root": str(root)},
        }
    )


def _staged(docs):
    job = next(d for d in docs if d["kind"] == "Job")
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    embedded = yaml.safe_load(docs[0]["data"]["spec.yaml"])
    return job["metadata"]["name"], cmd[cmd.index("--model") + 1], embedded["model"]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from runtime.registry import Registry

    reg = Registry(str(tmp_path))
    for i in (1, 2):
        src = tmp_path / f"model-v{i}"
        src.mkdir()
        (src / "config.json").write_text("{}")
    return reg


def test_promotion_changes_the_cache_key(registry, tmp_path):
    registry.register("support-bot", str(tmp_path / "model-v1"), params={}, metrics={}, tags={})
    registry.promote("support-bot", 1)
    job1, model1, local1 = _staged(render(_spec(tmp_path)))
    # the stager fetches exactly the version the alias named at render time
    assert model1 == "models:/support-bot/1"
    assert job1.startswith("stage-models-support-bot-1-")
    assert local1 == f"/mnt/weights/{job1.removeprefix('stage-')}"

    registry.register("support-bot", str(tmp_path / "model-v2"), params={}, metrics={}, tags={})
    assert _staged(render(_spec(tmp_path)))[1] == "models:/support-bot/1"  # challenger only
    registry.promote("support-bot", 2)
    job2, model2, local2 = _staged(render(_spec(tmp_path)))
    assert model2 == "models:/support-bot/2"
    assert job2 != job1 and local2 != local1  # a new folder, a new staging Job

    registry.rollback("support-bot")
    assert _staged(render(_spec(tmp_path)))[:2] == (job1, model1)  # back to the first copy


def test_pinned_versions_and_plain_refs_are_untouched(registry, tmp_path):
    from cluster.weights import model_key

    job, model, _ = _staged(render(_spec(tmp_path, "models:/support-bot/7")))
    assert (job, model) == (f"stage-{model_key('models:/support-bot/7')}", "models:/support-bot/7")
    assert _staged(render(_spec(tmp_path, "tiny")))[1] == "tiny"


def test_wait_message_names_the_alias_and_the_version(registry, tmp_path):
    registry.register("support-bot", str(tmp_path / "model-v1"), params={}, metrics={}, tags={})
    registry.promote("support-bot", 1)
    worker = render(_spec(tmp_path))[-1]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    wait = worker["template"]["spec"]["initContainers"][0]["command"][2]
    assert "the weights of models:/support-bot@champion (models:/support-bot/1) are not staged" in wait


def test_unresolvable_alias_keeps_the_ref_and_says_so(registry, tmp_path, capsys):
    # the registry exists but has no such model: render still works, with a warning
    registry.register("other", str(tmp_path / "model-v1"), params={}, metrics={}, tags={})
    _, model, _ = _staged(render(_spec(tmp_path)))
    assert model == "models:/support-bot@champion"
    err = capsys.readouterr().err
    assert "warning: models:/support-bot@champion not resolved at render time" in err
    assert "a later promotion will not reach this run" in err


def test_no_registry_here_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, model, _ = _staged(render(_spec(tmp_path)))
    assert model == "models:/support-bot@champion"
    assert not (tmp_path / "registry").exists()  # rendering never creates an MLflow database
    assert "set MLFLOW_TRACKING_URI" in capsys.readouterr().err


def test_registry_cache_of_a_remote_root_stays_out_of_the_working_dir(tmp_path, monkeypatch):
    from runtime.errors import RaylaneError
    from runtime.registry import local_registry_dir, parse_ref

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYLANE_REGISTRY_ROOT", str(tmp_path / "reg-root"))
    assert local_registry_dir("s3://bucket/raylane") == tmp_path / "reg-root" / "registry"
    monkeypatch.delenv("RAYLANE_REGISTRY_ROOT")
    assert local_registry_dir("s3://bucket/raylane") == Path("~/.raylane").expanduser() / "registry"
    assert local_registry_dir(str(tmp_path / "root")) == tmp_path / "root" / "registry"
    assert not (tmp_path / "s3:").exists()
    for bad in ("models:/../1", "models:/.@champion"):
        with pytest.raises(RaylaneError, match="bad registry reference"):
            parse_ref(bad)
