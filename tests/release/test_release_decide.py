"""The rollout decision logic on recorded per-arm metric sequences, and the state it drives (no Ray)."""

from __future__ import annotations

import json

import pytest

from runtime.errors import RaylaneError
from runtime.release.decide import ArmWindow, decide, p95
from runtime.release.state import RolloutState, RolloutStore
from runtime.specs.serving import RolloutSpec

CFG = RolloutSpec(min_step_s=60, min_requests=50, failure_limit=1, max_hold_s=120,
                  checks={"quality": {"golden_set": "golden.jsonl", "metric": "pkg.mod:score", "max_drop": 0.05}})
GOOD_CHAMP = ArmWindow(requests=900, errors=9, ttft_p95_s=0.20, e2e_p95_s=1.00, quality=0.80)
GOOD_CAND = ArmWindow(requests=100, errors=1, ttft_p95_s=0.22, e2e_p95_s=1.10, quality=0.82)


def run(sequence, cfg=CFG, now0=1000.0):
    """Feed (seconds since start, champion window, candidate window) evaluations through a fresh
    rollout state, as the controller would; the final state."""
    st = RolloutState.start(name="chat", app="chat", model_id="chat:bot", champion="models:/bot/1",
                            candidate="models:/bot/2", config=cfg.model_dump(mode="json"), now=now0)
    for t, champ, cand in sequence:
        if st.done:
            break
        d = decide(champ, cand, cfg, step=st.step, elapsed_s=st.elapsed_in_step(now0 + t), failures=st.failures,
                   baseline=st.baseline_window())
        st = st.apply(d, now0 + t)
    return st


def test_good_candidate_walks_every_step_and_is_promoted():
    idle = ArmWindow(quality=0.80)  # no live traffic at 100 %, but the probe still scores the champion
    seq = [
        (10, GOOD_CHAMP, GOOD_CAND),            # step 1: checks pass but too early -> hold
        (61, GOOD_CHAMP, GOOD_CAND),            # -> advance to 50 %
        (130, GOOD_CHAMP, ArmWindow(500, 4, 0.21, 1.05, 0.81)),   # 69 s into step 2 -> advance to 100 %
        (200, idle, ArmWindow(1000, 8, 0.21, 1.04, 0.81)),        # champion idle: its last window is the baseline
    ]
    st = run(seq)
    assert st.state == "promoted" and st.weight == 100
    assert [h["verdict"] for h in st.history] == ["hold", "advance", "advance", "promote"]
    assert [h["weight"] for h in st.history] == [10, 10, 50, 100]
    assert "champion from the previous step" in st.history[-1]["reason"]
    assert st.history[-1]["arms"]["champion"]["requests"] == 900  # the baseline it compared with
    assert st.failures == 0


def test_error_rate_increase_rolls_back_at_the_first_step():
    bad = ArmWindow(requests=100, errors=5, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=0.8)
    st = run([(5, GOOD_CHAMP, bad)])  # fails fast: before min_step_s, once min_requests is met
    assert st.state == "rolled_back" and st.weight == 0 and st.step == 0
    h = st.history[-1]
    assert h["check"] == "max_error_rate_increase" and h["failed"]
    assert "5.00% on the candidate vs 1.00% on the champion" in h["reason"]


def test_ttft_ratio_fails_and_failure_limit_allows_retries():
    slow = ArmWindow(requests=100, errors=1, ttft_p95_s=0.40, e2e_p95_s=1.1, quality=0.8)
    cfg = CFG.model_copy(update={"failure_limit": 2})
    st = run([(61, GOOD_CHAMP, slow), (91, GOOD_CHAMP, GOOD_CAND), (121, GOOD_CHAMP, slow)], cfg)
    assert [h["verdict"] for h in st.history] == ["hold", "advance", "rollback"]
    assert st.failures == 2 and st.state == "rolled_back"
    assert "TTFT p95 400 ms on the candidate vs 200 ms on the champion (ratio 2.00 > max_ttft_p95_ratio 1.25)" \
        in st.history[0]["reason"]
    assert "failure 1 of failure_limit 2" in st.history[0]["reason"]


def test_e2e_ratio_and_disabled_checks():
    slow = ArmWindow(requests=100, errors=1, ttft_p95_s=0.2, e2e_p95_s=2.0, quality=0.8)
    assert decide(GOOD_CHAMP, slow, CFG, step=0, elapsed_s=61).check == "max_e2e_p95_ratio"
    off = CFG.model_copy(update={"checks": CFG.checks.model_copy(update={"max_e2e_p95_ratio": None})})
    assert decide(GOOD_CHAMP, slow, off, step=0, elapsed_s=61).verdict == "advance"


def test_quality_drop_rolls_back():
    worse = ArmWindow(requests=100, errors=1, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=0.70)
    d = decide(GOOD_CHAMP, worse, CFG, step=0, elapsed_s=61)
    assert (d.verdict, d.check) == ("rollback", "quality.max_drop")
    assert "quality 0.7 on the candidate vs 0.8 on the champion (drop 0.1 > quality.max_drop 0.05)" in d.reason
    within = ArmWindow(requests=100, errors=1, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=0.76)
    assert decide(GOOD_CHAMP, within, CFG, step=0, elapsed_s=61).verdict == "advance"


def test_too_little_traffic_holds_then_fails_after_max_hold():
    thin = ArmWindow(requests=20, errors=0, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=0.8)
    st = run([(30, GOOD_CHAMP, thin), (100, GOOD_CHAMP, thin), (181, GOOD_CHAMP, thin)])
    verdicts = [(h["verdict"], h["inconclusive"]) for h in st.history]
    assert verdicts == [("hold", True), ("hold", True), ("rollback", True)]
    assert "candidate served 20 of min_requests 50" in st.history[0]["reason"]
    assert "holding for traffic" in st.history[1]["reason"]
    assert "min_step_s + max_hold_s = 180s" in st.history[2]["reason"]
    assert st.state == "rolled_back" and st.failures == 0


def test_too_little_traffic_fails_at_once_with_on_low_traffic_fail():
    thin = ArmWindow(requests=20, errors=0)
    cfg = CFG.model_copy(update={"on_low_traffic": "fail"})
    assert decide(GOOD_CHAMP, thin, cfg, step=0, elapsed_s=30).verdict == "hold"
    d = decide(GOOD_CHAMP, thin, cfg, step=0, elapsed_s=61)
    assert d.verdict == "rollback" and d.inconclusive and "on_low_traffic: fail" in d.reason


def test_inconclusive_without_a_quality_score_or_latency():
    no_probe = ArmWindow(requests=100, errors=1, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=None)
    d = decide(GOOD_CHAMP, no_probe, CFG, step=0, elapsed_s=61)
    assert (d.verdict, d.check, d.inconclusive) == ("hold", "quality.max_drop", True)
    assert "no quality probe score for the candidate" in d.reason
    no_ttft = ArmWindow(requests=100, errors=1, ttft_p95_s=None, e2e_p95_s=1.0, quality=0.8)
    d = decide(GOOD_CHAMP, no_ttft, CFG, step=0, elapsed_s=500)
    assert (d.verdict, d.check) == ("rollback", "max_ttft_p95_ratio") and "inconclusive" in d.reason
    # at 100 % with no champion traffic and no earlier window there is nothing to compare with
    d = decide(ArmWindow(), GOOD_CAND, CFG, step=2, elapsed_s=61)
    assert d.verdict == "hold" and "no earlier champion window" in d.reason


def test_p95_nearest_rank():
    assert p95([]) is None
    assert p95([0.5]) == 0.5
    assert p95([i / 100 for i in range(1, 101)]) == 0.95
    w = ArmWindow.from_samples(10, 1, ttft_s=[0.1] * 19 + [9.0], e2e_s=[1.0] * 20)
    assert w.ttft_p95_s == 0.1 and w.e2e_p95_s == 1.0 and w.error_rate == 0.1


def test_state_round_trips_through_the_store_and_a_restart_continues(tmp_path):
    store = RolloutStore(str(tmp_path))
    st = run([(61, GOOD_CHAMP, GOOD_CAND)])
    assert (st.step, st.weight, st.state) == (1, 50, "progressing")
    store.save(st)
    assert json.loads((tmp_path / "rollouts" / "chat" / "state.json").read_text())["step"] == 1
    assert not list((tmp_path / "rollouts" / "chat").glob("*.tmp-*"))  # written atomically, no leftovers
    again = store.load("chat")  # what a restarted controller reads
    assert again == st
    d = decide(GOOD_CHAMP, ArmWindow(500, 4, 0.21, 1.05, 0.81), CFG, step=again.step,
               elapsed_s=again.elapsed_in_step(1000 + 61 + 60))
    assert again.apply(d, 1000 + 121).step == 2


def test_finished_rollouts_take_no_decisions_and_abort_once():
    st = run([(5, GOOD_CHAMP, ArmWindow(100, 50))])
    assert st.state == "rolled_back"
    with pytest.raises(RaylaneError, match="rolled_back; it takes no more decisions"):
        st.apply(decide(GOOD_CHAMP, GOOD_CAND, CFG, step=0, elapsed_s=61))
    live = run([])
    aborted = live.abort("operator", now=2000)
    assert (aborted.state, aborted.weight, aborted.history[-1]["verdict"]) == ("aborted", 0, "abort")
    with pytest.raises(RaylaneError, match="already aborted"):
        aborted.abort()
    with pytest.raises(RaylaneError, match="no rollout named 'nope'"):
        RolloutStore("/nonexistent-root").load("nope")


def test_quality_probe_fails_fast_without_live_traffic():
    """The probe needs no live traffic: a drop rolls back before the candidate has min_requests."""
    worse = ArmWindow(requests=0, quality=0.5)
    d = decide(GOOD_CHAMP, worse, CFG, step=0, elapsed_s=1)
    assert (d.verdict, d.check, d.failed) == ("rollback", "quality.max_drop", True)
    assert d.arms["candidate"]["quality"] == 0.5 and d.arms["champion"]["quality"] == 0.8
    # a drop within max_drop does not decide anything without traffic
    d = decide(GOOD_CHAMP, ArmWindow(requests=0, quality=0.79), CFG, step=0, elapsed_s=1)
    assert (d.verdict, d.check, d.inconclusive) == ("hold", "min_requests", True)
    # with failure_limit 2 the first drop is counted and held
    cfg = CFG.model_copy(update={"failure_limit": 2})
    st = run([(1, GOOD_CHAMP, worse), (2, GOOD_CHAMP, worse)], cfg)
    assert [(h["verdict"], h["failed"]) for h in st.history] == [("hold", True), ("rollback", True)]


def test_quality_at_100_percent_compares_with_the_champion_probed_now():
    """At 100 % the champion's latency and errors come from the step before, its quality from the
    probe of this step (pinned to it although it serves no live traffic)."""
    baseline = ArmWindow(requests=900, errors=9, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=0.30)
    probed_now = ArmWindow(quality=0.90)
    cand = ArmWindow(requests=100, errors=1, ttft_p95_s=0.2, e2e_p95_s=1.0, quality=0.60)
    d = decide(probed_now, cand, CFG, step=2, elapsed_s=61, baseline=baseline)
    assert (d.verdict, d.check) == ("rollback", "quality.max_drop")
    assert d.arms["champion"]["requests"] == 900 and d.arms["champion"]["quality"] == 0.9
    d = decide(ArmWindow(), cand, CFG, step=2, elapsed_s=61, baseline=baseline)  # not probed yet
    assert (d.verdict, d.inconclusive) == ("hold", True) and "no quality probe score for the champion" in d.reason
