"""Sticky weighted arm choice: deterministic per (client, rollout, step), share = weight over many clients."""

from __future__ import annotations

import math

import pytest

from runtime.release.arms import bucket, choose_arm

KEYS = [f"key-digest-{i}" for i in range(20000)]


@pytest.mark.parametrize("weight", [1, 10, 50, 90])
def test_candidate_share_matches_the_weight(weight):
    share = sum(choose_arm(k, "r1", 0, weight) == "candidate" for k in KEYS) / len(KEYS)
    sigma = math.sqrt(weight / 100 * (1 - weight / 100) / len(KEYS))
    assert abs(share - weight / 100) < 4 * sigma  # a binomial draw: 4 sigma is ~1 in 16000


def test_sticky_within_a_step_and_redrawn_per_step():
    first = [choose_arm(k, "r1", 0, 10) for k in KEYS[:2000]]
    assert first == [choose_arm(k, "r1", 0, 10) for k in KEYS[:2000]]  # any replica, any time: same answer
    next_step = [choose_arm(k, "r1", 1, 10) for k in KEYS[:2000]]
    other_rollout = [choose_arm(k, "r2", 0, 10) for k in KEYS[:2000]]
    assert first != next_step and first != other_rollout
    # the redraw is independent: of the step-1 candidates, about 10 % are candidates again in step 2
    both = sum(a == b == "candidate" for a, b in zip(first, next_step))
    assert both < first.count("candidate") * 0.3


def test_edges():
    assert all(choose_arm(k, "r", 0, 0) == "champion" for k in KEYS[:500])
    assert all(choose_arm(k, "r", 0, 100) == "candidate" for k in KEYS[:500])
    assert all(0 <= bucket(k, "r", 3) < 100 for k in KEYS[:500])
