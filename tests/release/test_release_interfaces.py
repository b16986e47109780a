"""rollout_start / status / evaluate / abort and `raylane rollout` on a real MLflow SQLite registry (no Ray)."""

from __future__ import annotations

import json

import pytest
import yaml

from runtime import release
from runtime.errors import RaylaneError, SpecError
from runtime.release import ArmWindow
from tests.conftest import run_cli

CHAMP = ArmWindow(requests=400, errors=2, ttft_p95_s=0.2, e2e_p95_s=1.0)
GOOD = ArmWindow(requests=60, errors=0, ttft_p95_s=0.2, e2e_p95_s=1.0)
BAD = ArmWindow(requests=60, errors=30, ttft_p95_s=0.2, e2e_p95_s=1.0)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from runtime.registry import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reg = Registry(str(tmp_path))
    for v in (1, 2):
        (tmp_path / f"a{v}").mkdir()
        reg.register("bot", str(tmp_path / f"a{v}"), params={}, metrics={}, tags={})
    reg.promote("bot", 1)  # v1 champion, v2 challenger
    spec = {"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none",
            "storage": {"root": str(tmp_path)}, "adapters": {"support": "models:/bot@champion"},
            "rollout": {"adapter": "support", "steps": [10, 100], "min_step_s": 60, "min_requests": 50}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    return reg, path, tmp_path


def test_a_good_candidate_is_promoted_and_a_bad_one_rolled_back(setup):
    reg, path, root = setup
    st = release.rollout_start(path, now=1000)
    assert (st.state, st.weight, st.model_id) == ("progressing", 10, "chat:support")
    assert (st.champion, st.candidate) == ("models:/bot/1", "models:/bot/2")  # challenger pinned at start
    with pytest.raises(RaylaneError, match="already progressing"):
        release.rollout_start(path)

    st = release.rollout_evaluate("chat", CHAMP, GOOD, storage_root=str(root), now=1030)
    assert (st.state, st.step) == ("progressing", 0)          # too early
    st = release.rollout_evaluate("chat", CHAMP, GOOD, storage_root=str(root), now=1061)
    assert (st.step, st.weight) == (1, 100)
    assert reg.alias("bot", "champion").version == 1          # nothing moves before the end
    st = release.rollout_evaluate("chat", ArmWindow(), GOOD, storage_root=str(root), now=1125)
    assert st.state == "promoted"
    assert (reg.alias("bot", "champion").version, reg.alias("bot", "previous").version) == (2, 1)
    assert release.rollout_status("chat", str(root)) == st    # durable: what another process reads
    tags = reg.get("bot", 2).tags  # the decision record on the candidate's version
    prefix = f"raylane.rollout.{st.rollout_id}"
    assert tags["raylane.rollout"] == st.rollout_id and tags[f"{prefix}.state"] == "promoted"
    decisions = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(f"{prefix}.decision.")]
    assert [d["verdict"] for d in decisions] == ["advance", "promote"]  # the first hold stays in the state only
    assert decisions[0]["arms"]["candidate"]["requests"] == 60 and decisions[0]["step"] == 0
    with pytest.raises(RaylaneError, match="takes no more decisions"):
        release.rollout_evaluate("chat", CHAMP, GOOD, storage_root=str(root))

    # the next candidate fails its first step: rolled back, champion untouched
    (root / "a3").mkdir()
    reg.register("bot", str(root / "a3"), params={}, metrics={}, tags={})
    st = release.rollout_start(path, candidate="models:/bot/3", now=2000)
    assert (st.champion, st.candidate) == ("models:/bot/2", "models:/bot/3")
    st = release.rollout_evaluate("chat", CHAMP, BAD, storage_root=str(root), now=2005)
    assert (st.state, st.weight, st.history[-1]["check"]) == ("rolled_back", 0, "max_error_rate_increase")
    assert reg.alias("bot", "champion").version == 2
    assert reg.get("bot", 3).tags[f"raylane.rollout.{st.rollout_id}.state"] == "rolled_back"


def test_start_refuses_what_it_cannot_release(setup):
    reg, path, root = setup
    with pytest.raises(RaylaneError, match="is models:/bot/1, the champion itself"):
        release.rollout_start(path, candidate="models:/bot/1")
    with pytest.raises(SpecError, match="names model 'other'"):
        release.rollout_start(path, candidate="models:/other/1")
    with pytest.raises(RaylaneError, match="no version 9"):
        release.rollout_start(path, candidate="models:/bot/9")
    batch = root / "batch.yaml"
    batch.write_text(yaml.safe_dump({"kind": "BatchInference", "name": "b", "model": "tiny",
                                     "input": {"path": "x.jsonl"}, "output": {"path": "out"}}))
    with pytest.raises(SpecError, match="raylane rollout start serves OnlineInference specs"):
        release.rollout_start(batch)
    with pytest.raises(RaylaneError, match="no rollout named 'chat'"):
        release.rollout_status("chat", str(root))


def test_cli_start_status_abort(setup):
    reg, path, root = setup
    env = {"RAYLANE_STORAGE_ROOT": str(root), "RAY_ADDRESS": ""}  # no cluster: no controller
    r = run_cli("rollout", "start", str(path), "--json", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["state"], out["step"], out["weight"], out["candidate"]) == ("progressing", 1, 10, "models:/bot/2")
    release.rollout_evaluate("chat", CHAMP, GOOD, storage_root=str(root), now=out["updated_at"] + 5)
    r = run_cli("rollout", "status", "chat", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rollout chat: progressing  step 1/2  candidate weight 10%" in r.stdout
    assert "candidate requests=60 errors=0 (0.00%) ttft_p95=200ms" in r.stdout
    assert "reason: step 1/2 (10%): checks pass; 5s of min_step_s 60s" in r.stdout
    r = run_cli("rollout", "abort", "chat", "--json", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["state"], json.loads(r.stdout)["weight"]) == ("aborted", 0)
    assert reg.alias("bot", "champion").version == 1
    r = run_cli("rollout", "abort", "chat", env=env, timeout=120)
    assert r.returncode == 1 and "already aborted" in r.stderr and "Traceback" not in r.stderr


def test_quality_probe_settings_are_checked_and_settled_at_start(setup):
    from runtime.release.controller import start_controller

    reg, path, root = setup
    spec = yaml.safe_load(path.read_text())
    golden = root / "golden.jsonl"
    spec["rollout"]["checks"] = {"quality": {"golden_set": str(golden), "metric": "pkg.m:score"}}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(RaylaneError, match="rollout.checks.quality.golden_set: cannot read"):
        release.rollout_start(path)
    golden.write_text('{"prompt": "a"}\n')
    with pytest.raises(RaylaneError, match="golden_set: line 1 of .* is not"):
        release.rollout_start(path)
    golden.write_text('{"prompt": "a", "reference": "b"}\n')
    st = release.rollout_start(path)
    quality = st.config["checks"]["quality"]
    assert (quality["endpoint"], quality["golden_set"]) == ("http://127.0.0.1:8000", str(golden))
    assert st.probe_token and st.probe_token not in json.dumps(st.summary())
    release.rollout_abort("chat", str(root))
    with pytest.raises(RaylaneError, match="aborted; there is nothing to control"):
        start_controller("chat", str(root))


def test_an_abort_survives_a_controller_saving_at_the_same_moment(setup):
    from runtime.release.decide import decide
    from runtime.release.state import RolloutStore
    from runtime.specs.serving import RolloutSpec

    reg, path, root = setup
    store = RolloutStore(str(root))
    st = release.rollout_start(path, now=1000)
    seen = store.load("chat")  # the controller read the state...
    release.rollout_abort("chat", str(root), reason="operator")  # ...an abort lands...
    d = decide(CHAMP, GOOD, RolloutSpec.model_validate(st.config), step=0, elapsed_s=61)
    store.save(seen.apply(d, 1061))  # ...and the controller saves its decision over it
    after = release.rollout_status("chat", str(root))
    assert (after.state, after.weight, after.reason) == ("aborted", 0, "operator")
    # a new rollout of the same app is not touched by the old abort
    assert release.rollout_start(path).state == "progressing"
    assert release.rollout_status("chat", str(root)).state == "progressing"


def test_a_promotion_saved_but_not_applied_is_finished_once(setup):
    """The controller died after saving 'promoted' but before moving the alias."""
    import dataclasses

    from runtime.release.state import RolloutStore

    reg, path, root = setup
    st = release.rollout_start(path)
    promoted = dataclasses.replace(st, state="promoted", weight=100.0)
    RolloutStore(str(root)).save(promoted)
    assert reg.alias("bot", "champion").version == 1
    release.finish(promoted, str(root))  # what a restarted controller does first
    assert (reg.alias("bot", "champion").version, reg.alias("bot", "previous").version) == (2, 1)
    # someone promoted another version since: a late finish leaves it alone
    (root / "a3").mkdir()
    reg.register("bot", str(root / "a3"), params={}, metrics={}, tags={})
    reg.promote("bot", 3)
    release.finish(promoted, str(root))
    assert reg.alias("bot", "champion").version == 3
