"""One rollout decision from the two arms' metrics in the current step: pure, no Ray, no clock.

>>> from runtime.release.decide import ArmWindow, decide
>>> from runtime.specs.serving import RolloutSpec
>>> cfg = RolloutSpec(min_step_s=60, min_requests=50)
>>> champ = ArmWindow(requests=900, errors=9, ttft_p95_s=0.20, e2e_p95_s=1.0)
>>> cand = ArmWindow(requests=100, errors=1, ttft_p95_s=0.21, e2e_p95_s=1.1)
>>> decide(champ, cand, cfg, step=0, elapsed_s=61).verdict
'advance'

The controller calls ``decide`` every ``interval_s`` with the step's windows (both arms over the
same time span) and applies the verdict to the rollout's state (``runtime.release.state``):

- ``advance``: the step passed (enough time, enough traffic, every check); go to the next weight.
- ``promote``: the last step (100 %) passed; the candidate becomes the champion.
- ``hold``: wait, the step is not decided yet (too early, too little traffic, no quality score,
  or a failed check below ``failure_limit``).
- ``rollback``: a check failed ``failure_limit`` times, or the step stayed inconclusive past what
  ``on_low_traffic`` allows.

A check that fails counts as soon as the candidate has ``min_requests`` (fail fast); the quality
probe needs no live traffic, so its failure counts at once. A pass counts only once
``min_step_s`` has elapsed too. At 100 % the champion serves nothing, so its side comes from
``baseline``: its window from the step before (the probe still scores the champion itself, so
its quality is the current one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from runtime.specs.serving import RolloutSpec

Verdict = Literal["advance", "promote", "hold", "rollback"]


def p95(samples: list[float]) -> float | None:
    """The 95th percentile (nearest rank) of ``samples``; None for none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass(frozen=True)
class ArmWindow:
    """One arm's numbers over the current window: counts, latency p95s (seconds) and the quality
    probe's score (higher is better; None = not probed yet)."""

    requests: int = 0
    errors: int = 0
    ttft_p95_s: float | None = None
    e2e_p95_s: float | None = None
    quality: float | None = None

    @classmethod
    def from_samples(cls, requests: int, errors: int, ttft_s: list[float] = (), e2e_s: list[float] = (),
                     quality: float | None = None) -> ArmWindow:
        return cls(requests, errors, p95(list(ttft_s)), p95(list(e2e_s)), quality)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "error_rate": round(self.error_rate, 6)}


@dataclass(frozen=True)
class Decision:
    """A verdict and why: ``check`` names the check that decided (None when all passed),
    ``failed`` says a check failed (the state counts it), ``inconclusive`` that the step could
    not be judged (too little traffic or a missing number)."""

    verdict: Verdict
    reason: str
    check: str | None = None
    failed: bool = False
    inconclusive: bool = False
    arms: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(champion: ArmWindow, candidate: ArmWindow, cfg: RolloutSpec, *, step: int, elapsed_s: float,
           failures: int = 0, baseline: ArmWindow | None = None) -> Decision:
    """The verdict for step ``step`` (an index into ``cfg.steps``) after ``elapsed_s`` seconds in it,
    with ``failures`` failed evaluations so far in the rollout."""
    weight = cfg.steps[step]
    where = f"step {step + 1}/{len(cfg.steps)} ({weight:g}%)"
    ref = champion
    ref_note = ""
    if champion.requests < max(cfg.min_requests, 1) and baseline is not None:
        ref, ref_note = replace(baseline, quality=champion.quality), " (champion from the previous step)"
    arms = {"champion": ref.to_dict(), "candidate": candidate.to_dict()}

    def verdict(v: Verdict, reason: str, **kw) -> Decision:
        return Decision(v, f"{where}: {reason}", arms=arms, **kw)

    def inconclusive(check: str, why: str) -> Decision:
        if elapsed_s < cfg.min_step_s:
            return verdict("hold", f"waiting: {why} ({elapsed_s:.0f}s of min_step_s {cfg.min_step_s:g}s)",
                           check=check, inconclusive=True)
        if cfg.on_low_traffic == "fail":
            return verdict("rollback", f"inconclusive after min_step_s {cfg.min_step_s:g}s: {why} "
                           "(on_low_traffic: fail)", check=check, inconclusive=True)
        limit = cfg.min_step_s + cfg.max_hold_s
        if elapsed_s >= limit:
            return verdict("rollback", f"inconclusive after {elapsed_s:.0f}s (min_step_s + max_hold_s = "
                           f"{limit:g}s): {why}", check=check, inconclusive=True)
        return verdict("hold", f"holding for traffic: {why} ({elapsed_s:.0f}s of at most {limit:g}s)",
                       check=check, inconclusive=True)

    def failed(check: str, why: str) -> Decision:
        n = failures + 1
        if n >= cfg.failure_limit:
            return verdict("rollback", f"{why}; failure {n} of failure_limit {cfg.failure_limit}",
                           check=check, failed=True)
        return verdict("hold", f"{why}; failure {n} of failure_limit {cfg.failure_limit}, checking again",
                       check=check, failed=True)

    quality = _quality_problem(ref, candidate, cfg)
    if quality is not None and quality[0] == "failed":  # the probe needs no live traffic: fail fast
        return failed(quality[1], quality[2])
    if candidate.requests < cfg.min_requests:
        return inconclusive("min_requests", f"candidate served {candidate.requests} of min_requests "
                            f"{cfg.min_requests}")
    if ref.requests < max(cfg.min_requests, 1):
        return inconclusive("min_requests", f"champion served {ref.requests} of min_requests "
                            f"{cfg.min_requests} and there is no earlier champion window to compare with")

    outcome = _first_problem(ref, candidate, cfg, ref_note)
    if outcome is not None and outcome[0] == "missing":
        return inconclusive(outcome[1], outcome[2])
    if outcome is not None:
        return failed(outcome[1], outcome[2])

    if elapsed_s < cfg.min_step_s:
        return verdict("hold", f"checks pass; {elapsed_s:.0f}s of min_step_s {cfg.min_step_s:g}s")
    if step == len(cfg.steps) - 1:
        return verdict("promote", f"every check passed at every step{ref_note}; promoting the candidate")
    return verdict("advance", f"checks pass{ref_note}; next step {cfg.steps[step + 1]:g}%")


def _first_problem(champion: ArmWindow, candidate: ArmWindow, cfg: RolloutSpec,
                   note: str) -> tuple[Literal["failed", "missing"], str, str] | None:
    """(kind, check, why) of the first check that failed or lacks its numbers; None = all pass."""
    c = cfg.checks
    increase = candidate.error_rate - champion.error_rate
    if increase > c.max_error_rate_increase + 1e-12:
        return ("failed", "max_error_rate_increase",
                f"error rate {candidate.error_rate:.2%} on the candidate vs {champion.error_rate:.2%} on the "
                f"champion{note} (+{increase:.2%} > max_error_rate_increase {c.max_error_rate_increase:.2%})")
    for check, limit, what, attr in (("max_ttft_p95_ratio", c.max_ttft_p95_ratio, "TTFT p95", "ttft_p95_s"),
                                     ("max_e2e_p95_ratio", c.max_e2e_p95_ratio, "end-to-end p95", "e2e_p95_s")):
        if limit is None:
            continue
        cand, champ = getattr(candidate, attr), getattr(champion, attr)
        if cand is None or not champ:
            return "missing", check, f"no {what} on the {'candidate' if cand is None else 'champion'}"
        if cand / champ > limit:
            return ("failed", check, f"{what} {cand * 1000:.0f} ms on the candidate vs {champ * 1000:.0f} ms on the "
                    f"champion{note} (ratio {cand / champ:.2f} > {check} {limit:g})")
    return _quality_problem(champion, candidate, cfg)


def _quality_problem(champion: ArmWindow, candidate: ArmWindow,
                     cfg: RolloutSpec) -> tuple[Literal["failed", "missing"], str, str] | None:
    """The quality probe's (kind, check, why): its scores missing or a drop past ``max_drop``."""
    q = cfg.checks.quality
    if q is None:
        return None
    if candidate.quality is None or champion.quality is None:
        arm = "candidate" if candidate.quality is None else "champion"
        return "missing", "quality.max_drop", f"no quality probe score for the {arm} yet"
    drop = champion.quality - candidate.quality
    if drop > q.max_drop + 1e-12:
        return ("failed", "quality.max_drop",
                f"quality {candidate.quality:.4g} on the candidate vs {champion.quality:.4g} on the champion "
                f"(drop {drop:.4g} > quality.max_drop {q.max_drop:g})")
    return None
