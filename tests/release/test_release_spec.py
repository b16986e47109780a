"""The ``rollout:`` section of OnlineInference specs: defaults, validation, and the RayService it rides in."""

from __future__ import annotations

import pytest
import yaml

from runtime.errors import SpecError
from runtime.specs import dump_spec, parse_spec

BASE = {"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none",
        "adapters": {"support": "models:/bot@champion"}}


def problems(rollout) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "rollout": rollout})
    return [str(p) for p in e.value.problems]


def test_defaults_and_release_target():
    spec = parse_spec({**BASE, "rollout": {"adapter": "support"}})
    r = spec.rollout
    assert (r.steps, r.min_step_s, r.min_requests, r.failure_limit, r.on_low_traffic) == \
        ([10, 50, 100], 300, 100, 1, "hold")
    assert (r.checks.max_error_rate_increase, r.checks.max_ttft_p95_ratio, r.checks.quality) == (0.01, 1.25, None)
    assert spec.release_target() == ("chat:support", "models:/bot@champion")
    assert r.controller == "cluster"  # the serving replicas start its controller
    assert parse_spec(BASE).rollout is None  # optional: `raylane rollout start` uses the defaults


@pytest.mark.parametrize("steps, message", [
    ([50, 10, 100], "strictly increasing"),
    ([10, 50], "the last step must be 100"),
    ([0, 100], "above 0 and at most 100"),
    ([10, 150], "above 0 and at most 100"),
    ([], "at least 1 item"),
])
def test_steps_are_validated(steps, message):
    (p,) = problems({"adapter": "support", "steps": steps})
    assert p.startswith("rollout.steps:") and message in p


def test_errors_name_the_field_and_the_fix():
    (p,) = problems({"adapter": "nope"})
    assert "rollout.adapter: 'nope' is not a key of 'adapters' (support)" in p
    (p,) = problems({})  # no adapter: the base model, whose 'model' here is a folder, not an alias
    assert p.startswith("rollout.adapter: null releases the base model, so 'model' must be a registry alias")
    assert "models:/NAME@champion" in p and "'tiny'" in p


def test_a_base_model_rollout_needs_the_model_as_a_registry_alias():
    base = {**BASE, "model": "models:/base@champion", "adapters": {}}
    spec = parse_spec({**base, "rollout": {"steps": [25, 100]}})
    assert spec.release_target() == ("chat", "models:/base@champion")
    assert spec.rollout.candidate_start_timeout_s == 900
    assert parse_spec({**base, "rollout": {"candidate": "models:/base/3"}}).rollout.candidate == "models:/base/3"

    def base_problems(rollout, **over):
        with pytest.raises(SpecError) as e:
            parse_spec({**base, **over, "rollout": rollout})
        return [str(x) for x in e.value.problems]

    (p,) = base_problems({"candidate": "models:/other/2"})
    assert "names model 'other' but model is 'base'" in p and "models:/base/VERSION" in p
    (p,) = base_problems({"candidate": "models:/base@champion"})
    assert "is the champion itself (model)" in p
    (p,) = base_problems({}, model="models:/base/4")  # a pinned version: no alias to move
    assert "'model' must be a registry alias" in p and "'models:/base/4'" in p
    (p,) = problems({"adapter": "support", "controller": "auto"})
    assert p.startswith("rollout.controller:") and "'cluster' or 'manual'" in p
    (p,) = problems({"adapter": "support", "candidate": "models:/other/2"})
    assert "names model 'other'" in p and "models:/bot/VERSION" in p
    (p,) = problems({"adapter": "support", "candidate": "/some/folder"})
    assert "not a registry reference" in p
    (p,) = problems({"adapter": "support", "candidate": "models:/bot@champion"})
    assert "is the champion itself" in p and "models:/bot@challenger" in p
    (p,) = problems({"adapter": "support", "checks": {"quality": {"golden_set": "g.jsonl", "metric": "score"}}})
    assert p.startswith("rollout.checks.quality.metric: must be an import path")
    (p,) = problems({"adapter": "support", "checks": {"max_ttft_p95_ratio": 0.5}})
    assert p.startswith("rollout.checks.max_ttft_p95_ratio:")
    (p,) = problems({"adapter": "support", "on_low_traffic": "wait"})
    assert p.startswith("rollout.on_low_traffic:") and "'hold' or 'fail'" in p
    (p,) = problems({"adapter": "support", "min_step": 5})
    assert "rollout.min_step: unknown field; did you mean 'min_step_s'?" in p


def test_rollout_rides_in_the_rayservice_and_the_serve_config():
    from cluster import crds
    from cluster.render import render, serve_config_for

    rollout = {"adapter": "support", "steps": [20, 100], "min_requests": 30,
               "checks": {"quality": {"golden_set": "s3://b/golden.jsonl", "metric": "pkg.m:score", "max_drop": 0.1}}}
    spec = parse_spec({**BASE, "rollout": rollout})
    docs = render(spec)
    m = docs[-1]
    assert m["kind"] == "RayService" and crds.check_manifest(m) == []
    config = yaml.safe_load(m["spec"]["serveConfigV2"])
    embedded = parse_spec(yaml.safe_load(docs[0]["data"]["spec.yaml"]))  # the spec the cluster runs
    assert config == serve_config_for(embedded)
    carried = parse_spec(config["applications"][0]["args"]["spec"])  # what each replica parses
    assert carried.rollout == spec.rollout and carried.rollout.checks.quality.max_drop == 0.1
    assert dump_spec(carried) == dump_spec(embedded)
