"""A FineTune's ``release:``: the spec, and the eval gate handing a passing version to a rollout
instead of moving ``champion`` (the gate called at its function boundary, on a real MLflow
SQLite registry; no Ray)."""

from __future__ import annotations

import pytest
import yaml

from runtime import release
from runtime.errors import SpecError
from runtime.specs import dump_spec, parse_spec

SERVE = {"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none",
         "adapters": {"support": "models:/bot@champion", "other": "models:/elsewhere@champion"}}


def finetune(root, **release_section) -> dict:
    serve = {**SERVE, "storage": {"root": str(root)}}
    return {"kind": "FineTune", "name": "bot-ft", "base_model": "tiny", "data": {"path": "x.jsonl"},
            "registry": {"model_name": "bot"}, "storage": {"root": str(root)},
            "release": {"serve": serve, **release_section}}


def problems(data) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    return [str(p) for p in e.value.problems]


def test_release_spec_finds_the_adapter_and_validates(tmp_path):
    spec = parse_spec(finetune(tmp_path))
    assert spec.release.target("bot") == ("support", [])  # the adapter whose alias names this model
    r = spec.release.rollout_for("support")
    assert (r.adapter, r.steps, r.controller) == ("support", [10, 50, 100], "cluster")
    path = tmp_path / "serve.yaml"  # a path works like the spec inline
    path.write_text(yaml.safe_dump({**SERVE, "storage": {"root": str(tmp_path)},
                                    "rollout": {"adapter": "support", "steps": [20, 100]}}))
    from_file = parse_spec({**finetune(tmp_path), "release": {"serve": str(path)}})
    assert from_file.release.rollout_for("support").steps == [20, 100]  # the app's own rollout: section
    assert parse_spec(dump_spec(from_file)).release == from_file.release  # it travels inline
    assert parse_spec({**finetune(tmp_path)} | {"release": None}).release is None

    (p,) = problems({**finetune(tmp_path), "release": {"serve": "missing.yaml"}})
    assert p.startswith("release.serve: 'missing.yaml' is not a file")
    (p,) = problems(finetune(tmp_path, adapter="other"))
    assert "serves 'other' from 'models:/elsewhere@champion', but this fine-tune registers 'bot'" in p
    assert "registry.model_name" in p
    (p,) = problems(finetune(tmp_path, adapter="nope"))
    assert p.startswith("release.adapter: 'nope' is not a key of the adapters of app 'chat' (support, other)")
    (p,) = problems(finetune(tmp_path, rollout={"candidate": "models:/bot/3"}))
    assert p.startswith("release.rollout.candidate: the candidate is the version this run registers")
    (p,) = problems(finetune(tmp_path, rollout={"steps": [10, 50]}))
    assert p.startswith("release.rollout.steps:") and "the last step must be 100" in p
    (p,) = problems(finetune(tmp_path, rollout={"min_step": 5}))
    assert "did you mean 'min_step_s'" in p
    data = finetune(tmp_path)
    data["release"]["serve"]["storage"] = {"root": str(tmp_path / "elsewhere")}
    (p,) = problems(data)
    assert p.startswith("release.serve.storage.root") and "use one root for both" in p
    data = finetune(tmp_path)
    data["registry"] = {"model_name": "bot", "enabled": False}
    (p,) = problems(data)
    assert "release needs the registry (registry.enabled: true)" in p
    data = finetune(tmp_path)
    data["release"]["serve"]["adapters"] = {"support": "/some/folder"}
    (p,) = problems(data)
    assert "app 'chat' serves none from models:/bot@..." in p and "support -> /some/folder" in p
    data = finetune(tmp_path)  # the app serves this model as its base: a fine-tune's adapter cannot go there
    data["release"]["serve"].update(model="models:/bot@champion", adapters={})
    (p,) = problems(data)
    assert "serves models:/bot as its base model ('model'), but a FineTune registers LoRA adapters" in p


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One registry built once (MLflow's SQLite set-up is the slow part): bot v1 champion, v2 the
    fine-tune that just registered."""
    import os

    from runtime.registry import Registry

    root = tmp_path_factory.mktemp("registry-template")
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        reg = Registry(str(root))
        for v in (1, 2):
            (root / f"a{v}").mkdir()
            reg.register("bot", str(root / f"a{v}"), params={}, metrics={}, tags={})
        reg.promote("bot", 1)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return root


@pytest.fixture
def registry(template, tmp_path, monkeypatch):
    import shutil

    from runtime.registry import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(template / "registry", tmp_path / "registry")
    return Registry(str(tmp_path))


def gate(spec, reg, *, new=1.0, old=2.0):
    from runtime.registry import CHAMPION
    from runtime.training.runner import _gate

    champion = reg.alias("bot", CHAMPION)
    return _gate(spec, reg, reg.get("bot", 2), False, {"eval_loss": new},
                 None if champion is None else {"eval_loss": old}, champion)


def test_a_gate_pass_starts_a_rollout_instead_of_promoting(tmp_path, registry):
    spec = parse_spec(finetune(tmp_path, rollout={"steps": [50, 100], "min_step_s": 1, "min_requests": 5}))
    out, decision = gate(spec, registry)
    assert (out["version"], out["alias"]) == (2, "challenger") and decision["promote"]
    rel = decision["release"]
    assert rel["started"] and (rel["app"], rel["model_id"]) == ("chat", "chat:support")
    assert (rel["champion"], rel["candidate"], rel["steps"]) == ("models:/bot/1", "models:/bot/2", [50, 100])
    assert registry.alias("bot", "champion").version == 1  # the rollout moves it, not the gate
    st = release.rollout_status("chat", str(tmp_path))  # what the app's replicas and controller read
    assert (st.state, st.rollout_id, st.weight, st.config["min_requests"]) == ("progressing", rel["rollout_id"], 50, 5)

    # the rollout then decides as any other: a good candidate is promoted through the registry
    good = release.ArmWindow(requests=20, errors=0, ttft_p95_s=0.2, e2e_p95_s=1.0)
    st = release.rollout_evaluate("chat", good, good, storage_root=str(tmp_path), now=st.started_at + 2)
    st = release.rollout_evaluate("chat", release.ArmWindow(), good, storage_root=str(tmp_path),
                                  now=st.step_started_at + 2)
    assert st.state == "promoted", st.reason
    assert (registry.alias("bot", "champion").version, registry.alias("bot", "previous").version) == (2, 1)


def test_a_rollout_that_cannot_start_leaves_a_challenger(tmp_path, registry):
    spec = parse_spec(finetune(tmp_path))
    release.rollout_start(spec.release.serve.model_copy(update={"rollout": spec.release.rollout_for("support")}),
                          candidate="models:/bot/2")  # another rollout holds the app
    out, decision = gate(spec, registry)
    assert out["alias"] == "challenger" and registry.alias("bot", "champion").version == 1
    rel = decision["release"]
    assert not rel["started"] and "already progressing" in rel["error"] and "rollout abort chat" in rel["hint"]


def test_without_release_or_a_champion_the_gate_promotes_as_before(tmp_path, registry):
    plain = parse_spec({k: v for k, v in finetune(tmp_path).items() if k != "release"})
    out, decision = gate(plain, registry)
    assert out["alias"] == "champion" and "release" not in decision
    assert registry.alias("bot", "champion").version == 2
    # the first version of a model has nothing to be compared with: champion at once, no rollout
    registry.client.delete_registered_model_alias("bot", "champion")
    out, decision = gate(parse_spec(finetune(tmp_path)), registry)
    assert out["alias"] == "champion" and "release" not in decision
    with pytest.raises(Exception, match="no rollout named 'chat'"):
        release.rollout_status("chat", str(tmp_path))
    # a failed gate starts nothing either
    out, decision = gate(parse_spec(finetune(tmp_path)), registry, new=3.0, old=2.0)
    assert out["alias"] == "challenger" and not decision["promote"] and "release" not in decision


def test_the_drift_fine_tune_carries_the_release(tmp_path):
    """jobs.drift_check fine-tunes ``spec.with_run_name(...)`` through the same gate: the release rides along."""
    spec = parse_spec({**finetune(tmp_path), "drift": {"data": {"path": "recent.jsonl"}}})
    run = spec.with_run_name("bot-ft-drift-1")
    assert (run.name, run.registered_name(), run.release) == ("bot-ft-drift-1", "bot", spec.release)


def test_rendered_manifests_carry_the_release_with_the_pods_storage_root(tmp_path):
    """KubeRay: the FineTune's RayJob embeds the app's spec with the root its pods see, and the app's
    RayService carries its rollout: settings; both CRD-checked. A root the pods do not share is named."""
    from cluster import crds
    from cluster.render import render
    from cluster.storage import storage_problems

    shared = {"storage": {"claim_name": "team-share"}}  # mounted at /mnt/raylane in every pod
    data = finetune(tmp_path, rollout={"steps": [25, 100], "min_requests": 40})
    data["kubernetes"] = shared
    data["release"]["serve"]["kubernetes"] = shared
    spec = parse_spec(data)
    assert storage_problems(spec) == []
    docs = render(spec)
    job = docs[-1]
    assert job["kind"] == "RayJob" and crds.check_manifest(job) == []
    ran = parse_spec(yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["spec.yaml"]))
    assert ran.storage.root == ran.release.serve.storage.root == "/mnt/raylane"  # what the pod validates
    assert ran.release.rollout_for("support").steps == [25, 100]

    serve = parse_spec({**data["release"]["serve"], "rollout": {"adapter": "support", "controller": "cluster"}})
    service = render(serve)[-1]
    assert service["kind"] == "RayService" and crds.check_manifest(service) == []
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["spec"]
    carried = parse_spec(args)  # what each replica (and so the supervisor) reads
    assert carried.rollout == serve.rollout and carried.storage.root == "/mnt/raylane"

    local = parse_spec({**SERVE, "storage": {"root": str(tmp_path)}, "rollout": {"adapter": "support"}})
    assert "rollout" in [p.path for p in storage_problems(local)]  # state and counts must be shared
    data["release"]["serve"]["kubernetes"] = {"storage": {"claim_name": "team-share", "mount_path": "/mnt/other"}}
    (p,) = [p for p in storage_problems(parse_spec(data)) if p.path == "release.serve"]
    assert "'/mnt/other'" in p.message and "'/mnt/raylane'" in p.message
