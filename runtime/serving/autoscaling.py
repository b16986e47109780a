"""Queue-depth / KV-cache autoscaling for vLLM replicas, as a Ray Serve custom policy.

Online inference scales on what users feel: requests waiting for a decode slot and KV-cache
saturation. CPU or GPU utilisation says nothing about either (a busy GPU may be serving its
batch fine), so it is never an input. Up fast (as many replicas as the queue needs, at once),
down slowly (load must stay low for ``downscale_cooldown_s``, then one replica per
``downscale_step_s``), with a warm floor.

The decision is a pure function of an ``Observation`` so it is unit-tested on recorded metric
sequences; ``QueueDepthPolicy`` adapts Serve's ``AutoscalingContext`` to it.

>>> p = PolicyParams(min_replicas=1, max_replicas=4)
>>> decide(Observation(now=0, current=1, waiting=9, kv_usage=0.1, ongoing=9), p, {})[0]
4
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Metric names the engine replica reports (LLMServer.record_autoscaling_stats).
WAITING = "num_requests_waiting"
RUNNING = "num_requests_running"
KV_USAGE = "kv_cache_usage"

# Load must fall below this share of the threshold before a replica counts as idle; the gap
# between scale-up and scale-down levels stops flapping around one value.
KV_DOWN_FRACTION = 0.5


@dataclass(frozen=True)
class PolicyParams:
    min_replicas: int = 1
    max_replicas: int = 1
    target_waiting_per_replica: float = 2.0
    kv_cache_threshold: float = 0.8
    downscale_cooldown_s: float = 300.0
    downscale_step_s: float = 60.0
    max_num_seqs: int = 64

    @classmethod
    def from_spec(cls, spec) -> PolicyParams:
        a = spec.autoscaling
        return cls(
            min_replicas=a.floor(spec.slo),
            max_replicas=a.max_replicas,
            target_waiting_per_replica=a.target_waiting_per_replica,
            kv_cache_threshold=a.kv_cache_threshold,
            downscale_cooldown_s=a.downscale_cooldown_s,
            downscale_step_s=a.downscale_step_s,
            max_num_seqs=spec.max_num_seqs,
        )

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Observation:
    """One autoscaling tick: replica count and summed engine metrics across replicas."""

    now: float
    current: int
    waiting: float  # queued in the engines + queued at Serve handles
    kv_usage: float  # the most saturated replica, 0-1
    ongoing: float  # everything in flight (running + waiting)


def decide(obs: Observation, p: PolicyParams, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Target replica count and the policy's new state (``low_since``, ``last_down``)."""
    state = dict(state)
    current = obs.current
    lo, hi = p.min_replicas, p.max_replicas
    if current == 0:
        # Cold start: any demand wakes one replica (more follow on the next tick if queued).
        target = 1 if obs.ongoing > 0 or obs.waiting > 0 else 0
        state.pop("low_since", None)
        return _clamp(max(target, lo), lo, hi), state

    need = current
    if obs.waiting > p.target_waiting_per_replica * current:
        need = max(need, math.ceil(obs.waiting / p.target_waiting_per_replica))
    if obs.kv_usage > p.kv_cache_threshold:
        need = max(need, current + 1)
    if need > current:
        state.pop("low_since", None)
        return _clamp(need, lo, hi), state

    # Could one replica fewer carry the load without queueing or KV pressure?
    fits_fewer = obs.ongoing <= (current - 1) * p.max_num_seqs * 0.5 if current > 1 else obs.ongoing == 0
    low = obs.waiting == 0 and obs.kv_usage < p.kv_cache_threshold * KV_DOWN_FRACTION and fits_fewer
    if not low or current <= lo:
        state.pop("low_since", None)
        return _clamp(current, lo, hi), state

    low_since = state.setdefault("low_since", obs.now)
    last_down = state.get("last_down")
    cooled = obs.now - low_since >= p.downscale_cooldown_s
    stepped = last_down is None or obs.now - last_down >= p.downscale_step_s
    if cooled and stepped:
        state["last_down"] = obs.now
        return _clamp(current - 1, lo, hi), state
    return _clamp(current, lo, hi), state


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def observation_from_context(ctx) -> Observation:
    """Summarise Serve's ``AutoscalingContext`` (engine metrics are per replica)."""
    metrics = ctx.aggregated_metrics or {}
    engine_waiting = sum(metrics.get(WAITING, {}).values())
    engine_running = sum(metrics.get(RUNNING, {}).values())
    kv = max(metrics.get(KV_USAGE, {}).values(), default=0.0)
    handle_queued = ctx.total_queued_requests or 0.0
    ongoing = max(float(ctx.total_num_requests or 0.0), engine_running + engine_waiting)
    return Observation(
        now=ctx.current_time,
        # The committed target, not the running count: replicas still starting (the first one
        # at deploy, or ones just added) must not read as "zero replicas, no demand".
        current=max(ctx.current_num_replicas, ctx.target_num_replicas or 0),
        waiting=engine_waiting + handle_queued,
        kv_usage=kv,
        ongoing=ongoing,
    )


class QueueDepthPolicy:
    """Serve custom autoscaling policy (``autoscaling_config.policy.policy_function``).

    Serve instantiates it once with ``policy_kwargs`` (a ``PolicyParams`` dict) and calls it
    every control-loop tick.
    """

    def __init__(self, **params: Any):
        self.params = PolicyParams(**params)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        import time

        obs = observation_from_context(ctx)
        if obs.now is None:
            obs = Observation(time.time(), obs.current, obs.waiting, obs.kv_usage, obs.ongoing)
        mine = {k: v for k, v in (ctx.policy_state or {}).items() if k in ("low_since", "last_down")}
        target, state = decide(obs, self.params, mine)
        return target, state


POLICY_IMPORT_PATH = "runtime.serving.autoscaling:QueueDepthPolicy"


def autoscaling_config(spec) -> dict[str, Any]:
    """The deployment's ``autoscaling_config``: raylane's policy, with Serve's own delays off
    (the policy does its own cooldown; stacking Serve's would double it)."""
    params = PolicyParams.from_spec(spec)
    return {
        "min_replicas": params.min_replicas,
        "initial_replicas": max(1, params.min_replicas),
        "max_replicas": params.max_replicas,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "metrics_interval_s": 2.0,
        "look_back_period_s": 10.0,
        "policy": {"policy_function": POLICY_IMPORT_PATH, "policy_kwargs": params.to_kwargs()},
    }
