"""Unit tests: the queue-depth / KV-cache autoscaling decisions on recorded metric sequences."""

from __future__ import annotations

from types import SimpleNamespace

from runtime.serving.autoscaling import (
    KV_USAGE,
    RUNNING,
    WAITING,
    Observation,
    PolicyParams,
    QueueDepthPolicy,
    autoscaling_config,
    decide,
)
from runtime.specs import parse_spec

P = PolicyParams(min_replicas=1, max_replicas=8, target_waiting_per_replica=2, kv_cache_threshold=0.8,
                 downscale_cooldown_s=300, downscale_step_s=60, max_num_seqs=16)


def replay(samples, params=P, start=1, every=10.0):
    """Feed (waiting, kv_usage, ongoing) samples every ``every`` s; return the replica trace."""
    current, state, trace = start, {}, []
    for i, (waiting, kv, ongoing) in enumerate(samples):
        current, state = decide(Observation(i * every, current, waiting, kv, ongoing), params, state)
        trace.append(current)
    return trace


def test_burst_scales_up_at_once_to_what_the_queue_needs():
    trace = replay([(0, 0.1, 2), (20, 0.3, 36), (20, 0.4, 36)])
    assert trace[0] == 1
    assert trace[1] == 8  # ceil(20 / 2) = 10, capped at max_replicas, in one tick
    assert trace[2] == 8


def test_burst_respects_max_replicas():
    assert replay([(100, 0.2, 120)], PolicyParams(min_replicas=1, max_replicas=3))[0] == 3


def test_plateau_holds_steady():
    # 3 replicas busy but nothing waiting and KV comfortable: no change for an hour.
    trace = replay([(0, 0.5, 30)] * 360, start=3)
    assert set(trace) == {3}


def test_short_dip_does_not_scale_down():
    # 4 minutes of near-idle (< the 300 s cooldown), then load returns.
    samples = [(0, 0.5, 40)] * 6 + [(0, 0.05, 1)] * 24 + [(0, 0.5, 40)] * 6
    trace = replay(samples, start=4)
    assert set(trace) == {4}


def test_kv_pressure_adds_a_replica_without_any_queue():
    trace = replay([(0, 0.85, 10)], start=2)
    assert trace == [3]
    # Just under the threshold: no change.
    assert replay([(0, 0.79, 10)], start=2) == [2]


def test_idle_steps_down_slowly_to_the_warm_floor():
    trace = replay([(0, 0.0, 0)] * 120, start=4)  # 20 minutes idle, a tick every 10 s
    first_down = trace.index(3)
    assert first_down * 10 >= 300  # nothing removed during the cooldown
    # One replica per minute at most, and never below the floor of 1.
    downs = [i for i in range(1, len(trace)) if trace[i] < trace[i - 1]]
    assert all(trace[i - 1] - trace[i] == 1 for i in downs)
    assert all((b - a) * 10 >= 60 for a, b in zip(downs, downs[1:]))
    assert trace[-1] == 1 and min(trace) == 1


def test_idle_without_slo_scales_to_zero_and_wakes_on_demand():
    params = PolicyParams(min_replicas=0, max_replicas=2, downscale_cooldown_s=300, downscale_step_s=60)
    trace = replay([(0, 0.0, 0)] * 60, params, start=1)
    assert trace[-1] == 0 and trace.index(0) * 10 >= 300
    # A request arrives with zero replicas: one replica starts immediately.
    assert decide(Observation(0, 0, 1, 0.0, 1), params, {})[0] == 1


def test_load_during_cooldown_restarts_it():
    samples = [(0, 0.0, 0)] * 20 + [(6, 0.5, 20)] + [(0, 0.0, 0)] * 25
    trace = replay(samples, start=2)
    # 200 s low, a burst (scale up), then 250 s low: never 300 s in a row, so no scale-down.
    assert min(trace) >= 2


def test_policy_reads_serve_context_engine_metrics():
    policy = QueueDepthPolicy(**P.to_kwargs())
    ctx = SimpleNamespace(
        aggregated_metrics={WAITING: {"r1": 5.0, "r2": 4.0}, RUNNING: {"r1": 16.0, "r2": 16.0},
                            KV_USAGE: {"r1": 0.3, "r2": 0.5}},
        total_queued_requests=1.0, total_num_requests=42.0, current_time=1000.0,
        current_num_replicas=2, target_num_replicas=2, policy_state={},
    )
    target, _ = policy(ctx)
    assert target == 5  # (5 + 4 + 1 queued) / 2 per replica
    # At deploy time no replica runs yet but one is wanted: idle must not cancel it.
    idle = SimpleNamespace(aggregated_metrics={}, total_queued_requests=0.0, total_num_requests=0.0,
                           current_time=0.0, current_num_replicas=0, target_num_replicas=1, policy_state={})
    assert QueueDepthPolicy(**{**P.to_kwargs(), "min_replicas": 0})(idle)[0] == 1


def test_spec_floor_and_serve_config():
    base = {"kind": "OnlineInference", "name": "x", "model": "tiny", "auth": "none"}
    assert parse_spec(base).autoscaling.floor(None) == 0
    with_slo = parse_spec({**base, "slo": {"ttft_ms_p95": 200}})
    cfg = autoscaling_config(with_slo)
    assert cfg["min_replicas"] == 1
    assert cfg["policy"]["policy_function"] == "runtime.serving.autoscaling:QueueDepthPolicy"
    assert cfg["policy"]["policy_kwargs"]["kv_cache_threshold"] == 0.8
    assert cfg["policy"]["policy_kwargs"]["downscale_cooldown_s"] == 300
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**cfg)  # Serve's own model accepts it and can load the policy
