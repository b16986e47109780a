"""The quality probe's client side (no engine): golden set in, one pinned request per prompt and
arm, the metric's score per arm, clear errors. The serving side of the pin is in
test_release_canary; the probe on a live engine in test_release_live."""

from __future__ import annotations

import json

import httpx
import pytest

from runtime.errors import RaylaneError
from runtime.release.probe import (
    exact_match,
    probe_api_key,
    read_golden_set,
    run_probe,
    step_scores,
)
from runtime.release.state import RolloutState
from runtime.specs.serving import QualityProbeSpec


def state():
    return RolloutState.start(name="chat", app="chat", model_id="chat:bot", champion="models:/bot/1",
                              candidate="models:/bot/2", config={"steps": [50, 100]})


def endpoint(seen, answers):
    """A stand-in for the app: answers[arm][prompt], the arm it was pinned to in the header."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        arm = request.headers["x-raylane-arm"]
        seen.append((arm, request.headers["x-raylane-probe"], request.headers.get("authorization"), body))
        version = "models:/bot/2" if arm == "candidate" else "models:/bot/1"
        return httpx.Response(200, headers={"x-raylane-arm": arm, "x-raylane-model-version": version},
                              json={"choices": [{"text": answers[arm][body["prompt"]]}]})
    return httpx.Client(transport=httpx.MockTransport(handle))


@pytest.fixture
def golden(tmp_path):
    path = tmp_path / "golden.jsonl"
    path.write_text('{"prompt": "a", "reference": " A"}\n\n{"prompt": "b", "reference": "B"}\n')
    return path


def test_each_arm_is_pinned_and_scored_by_the_metric(golden, tmp_path):
    st, seen = state(), []
    q = QualityProbeSpec(golden_set=str(golden), metric="runtime.release.probe:exact_match", max_tokens=5,
                         endpoint="http://app:8000")
    answers = {"champion": {"a": "A ", "b": "B"}, "candidate": {"a": "A", "b": "nope"}}
    scores = run_probe(st, q, api_key="k1", client=endpoint(seen, answers))
    assert (scores["champion"], scores["candidate"], scores["prompts"]) == (1.0, 0.5, 2)
    assert [(arm, b["prompt"]) for arm, _, _, b in seen] == [("champion", "a"), ("champion", "b"),
                                                             ("candidate", "a"), ("candidate", "b")]
    arm, token, auth, body = seen[0]
    assert token == st.probe_token and auth == "Bearer k1"
    assert body == {"model": "chat:bot", "prompt": "a", "max_tokens": 5, "temperature": 0}
    # once per step: saved next to the step's windows, not probed again
    assert step_scores(str(tmp_path), st, q, client=endpoint(seen, answers))["candidate"] == 0.5
    n = len(seen)
    assert step_scores(str(tmp_path), st, q, client=endpoint(seen, answers))["candidate"] == 0.5
    assert len(seen) == n


def test_probe_errors_name_the_field_or_the_arm(golden, tmp_path):
    st = state()
    q = QualityProbeSpec(golden_set=str(golden), metric="runtime.release.probe:exact_match", endpoint="http://app")
    unpinned = httpx.Client(transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"choices": [{"text": "x"}]})))
    with pytest.raises(RaylaneError, match=r"the champion \(models:/bot/1\) was pinned but no arm served golden prompt 1"):
        run_probe(st, q, client=unpinned)
    failing = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503, text="engine down")))
    with pytest.raises(RaylaneError, match="golden prompt 1 on the champion got HTTP 503: engine down"):
        run_probe(st, q, client=failing)
    answers = {"champion": {"a": "", "b": ""}}
    with pytest.raises(RaylaneError, match="metric: builtins:max returned .* not a number"):
        run_probe(st, q.model_copy(update={"metric": "builtins:max"}), client=endpoint([], answers))
    with pytest.raises(RaylaneError, match="metric: json:dumps raised TypeError"):
        run_probe(st, q.model_copy(update={"metric": "json:dumps"}), client=endpoint([], answers))
    missing = q.model_copy(update={"metric": "no_such_module_x:score"})
    with pytest.raises(RaylaneError, match="rollout.checks.quality.metric: cannot import 'no_such_module_x'"):
        run_probe(st, missing, client=unpinned)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "reference": 3}\n')
    with pytest.raises(RaylaneError, match="golden_set: line 1 of .* is not"):
        read_golden_set(str(tmp_path / "bad.jsonl"))


def test_exact_match_and_the_probe_key():
    assert exact_match(["a", " b "], ["a", "b"]) == 1.0 and exact_match([], []) == 0.0
    assert probe_api_key({"RAYLANE_PROBE_API_KEY": "p", "RAYLANE_API_KEYS": "z,y"}) == "p"
    assert probe_api_key({"RAYLANE_API_KEYS": "z,y"}) == "y"
    assert probe_api_key({}) is None
