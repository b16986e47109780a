"""Canary releases of a served model or adapter: start, inspect, decide, abort.

>>> import runtime.release as release
>>> st = release.rollout_start("examples/serve.yaml", candidate="models:/bot/3")   # doctest: +SKIP
>>> release.rollout_status("chat").state                                          # doctest: +SKIP
'progressing'
>>> release.rollout_abort("chat")                                                 # doctest: +SKIP

A rollout is named after the serving app (one at a time per app) and lives as a JSON state under
the storage root (``runtime.release.state``). ``rollout_evaluate`` is one turn of the controller:
the two arms' windows in, a decision recorded, and on ``promote`` the registry alias ``champion``
moved to the candidate (the old one becomes ``previous``); a rollback leaves the aliases alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.defaults import default_storage_root
from runtime.errors import RaylaneError, SpecError, SpecProblem
from runtime.release.arms import choose_arm
from runtime.release.decide import ArmWindow, Decision, decide
from runtime.release.state import RolloutState, RolloutStore

__all__ = [
    "ArmWindow", "Decision", "RolloutState", "RolloutStore", "choose_arm", "decide", "finish",
    "rollout_abort", "rollout_control", "rollout_evaluate", "rollout_start", "rollout_status",
]


def rollout_start(spec: str | Path | dict[str, Any] | Any, candidate: str | None = None, *,
                  now: float | None = None) -> RolloutState:
    """Start releasing ``candidate`` (default: the spec's ``rollout.candidate``, else
    ``models:/NAME@challenger``) on the serving app ``spec`` against its current champion. Both
    are pinned to registry versions now, so moving an alias later does not change the rollout."""
    from runtime.registry import parse_ref
    from runtime.specs import load_spec
    from runtime.specs.serving import OnlineInferenceSpec, RolloutSpec, rollout_problems

    spec = load_spec(spec, kind=OnlineInferenceSpec, entrypoint="raylane rollout start")
    rollout = spec.rollout or RolloutSpec()
    if candidate is not None:
        rollout = rollout.model_copy(update={"candidate": candidate})
    problems = rollout_problems(spec, rollout)
    if problems:
        raise SpecError(f"rollout of {spec.name!r}", [SpecProblem("", p) for p in problems],
                        hint="fix the spec's rollout section or --candidate, then rerun `raylane rollout start`")
    rollout = _with_probe_defaults(spec, rollout)
    model_id, champion_ref = spec.release_target(rollout)
    name = parse_ref(champion_ref)[0]
    root = spec.storage.resolved()
    champion = _pinned(champion_ref, root)
    chosen = _pinned(rollout.candidate or f"models:/{name}@challenger", root)
    if chosen == champion:
        raise RaylaneError(f"candidate {rollout.candidate or 'challenger'} is {champion}, the champion itself",
                           hint=f"`raylane registry list {name}` shows the versions; name a newer one")
    store = RolloutStore(root)
    if store.exists(spec.name):
        running = store.load(spec.name)
        if not running.done:
            raise RaylaneError(f"rollout {spec.name!r} is already progressing (step {running.step + 1}, "
                               f"candidate {running.candidate} at {running.weight:g}%)",
                               hint=f"`raylane rollout abort {spec.name}` ends it first")
    # A base-model candidate gets an app of its own, which the controller builds from this spec
    # (dumped: a spec never holds key values, only where keys are).
    from runtime.specs import dump_spec

    serve_spec = dump_spec(spec.model_copy(update={"rollout": None})) if rollout.adapter is None else None
    state = RolloutState.start(name=spec.name, app=spec.name, model_id=model_id, champion=champion,
                               candidate=chosen, config=rollout.model_dump(mode="json"), now=now,
                               serve_spec=serve_spec)
    store.save(state)
    return state


def rollout_status(name: str, storage_root: str | None = None) -> RolloutState:
    """The saved state of rollout ``name`` (the serving app's name)."""
    return RolloutStore(_root(storage_root)).load(name)


def rollout_abort(name: str, storage_root: str | None = None, reason: str = "aborted by hand") -> RolloutState:
    """End rollout ``name`` now: the candidate's weight goes to 0; registry aliases are untouched."""
    store = RolloutStore(_root(storage_root))
    state = store.abort(name, reason)
    record_outcome(state, store.storage_root)
    return state


def rollout_control(name: str, address: str | None, storage_root: str | None = None):
    """Start (or find) rollout ``name``'s controller, a detached actor on the Ray cluster at
    ``address`` (else ``$RAY_ADDRESS``): the cluster that serves the app, which the controller
    outlives this process on. ``storage_root`` must be the root as that cluster sees it."""
    from runtime.ray_env import init_ray, resolve_address
    from runtime.release.controller import start_controller

    if resolve_address(address) is None:
        raise RaylaneError("a rollout controller lives on the cluster that serves the app; without an address "
                           "it would run on a new local cluster that ends with this process",
                           hint="pass --address HOST:PORT of that cluster (or set RAY_ADDRESS)")
    init_ray(address)
    return start_controller(name, _root(storage_root))


def rollout_evaluate(name: str, champion: ArmWindow, candidate: ArmWindow, *, storage_root: str | None = None,
                     now: float | None = None) -> RolloutState:
    """One controller turn: decide the current step from the two arms' windows, record the
    decision, and on ``promote`` move the registry alias ``champion`` to the candidate. The state
    is saved before the registry moves; a controller that dies in between finishes on restart
    (``finish``)."""
    from runtime.specs.serving import RolloutSpec

    root = _root(storage_root)
    store = RolloutStore(root)
    state = store.load(name)
    cfg = RolloutSpec.model_validate(state.config)
    decision = decide(champion, candidate, cfg, step=state.step, elapsed_s=state.elapsed_in_step(now),
                      failures=state.failures, baseline=state.baseline_window())
    state = state.apply(decision, now)
    store.save(state)
    if state.done:
        finish(state, root)
    return state


def finish(state: RolloutState, storage_root: str) -> None:
    """The registry side of a finished rollout, safe to repeat: a promotion moves ``champion`` to
    the candidate unless it is there already or someone has moved it elsewhere since the start;
    the outcome goes into the candidate version's tags."""
    from runtime.registry import CHAMPION, Registry, parse_ref

    if state.state == "promoted":
        model, _, version = parse_ref(state.candidate)
        reg = Registry(storage_root)
        current = reg.alias(model, CHAMPION)
        if current is None or current.version == parse_ref(state.champion)[2]:
            reg.promote(model, version)  # the old champion becomes 'previous'
    record_outcome(state, storage_root)


def record_outcome(state: RolloutState, storage_root: str) -> None:
    """The rollout's outcome as tags on the candidate's registry version: its id, final state and
    reason, and each decision that moved or failed something (advance, promote, rollback, abort, a
    failed check) as JSON with its step, per-arm numbers, verdict and reason. Plain holds stay in
    the state's history only."""
    import json

    from runtime.registry import Registry, parse_ref

    model, _, version = parse_ref(state.candidate)
    prefix = f"raylane.rollout.{state.rollout_id}"
    tags = {"raylane.rollout": state.rollout_id, f"{prefix}.state": state.state, f"{prefix}.reason": state.reason}
    for i, h in enumerate(state.history):
        if h["verdict"] != "hold" or h.get("failed"):
            tags[f"{prefix}.decision.{i:03d}"] = json.dumps(h, separators=(",", ":"), default=str)
    Registry(storage_root).set_tags(model, version, tags)


def _with_probe_defaults(spec, rollout):
    """``rollout`` with its quality probe's endpoint and golden set path settled now (a relative
    path is taken from here), the golden set checked before anything starts."""
    from runtime.release.probe import read_golden_set
    from runtime.storage import is_remote

    q = rollout.checks.quality
    if q is None:
        return rollout
    golden = q.golden_set if is_remote(q.golden_set) else str(Path(q.golden_set).expanduser().resolve())
    q = q.model_copy(update={"golden_set": golden, "endpoint": q.endpoint or f"http://127.0.0.1:{spec.port}"})
    read_golden_set(q.golden_set)
    return rollout.model_copy(update={"checks": rollout.checks.model_copy(update={"quality": q})})


def _pinned(ref: str, storage_root: str) -> str:
    """``models:/NAME/VERSION`` of an existing version (an alias resolved now)."""
    from runtime.registry import Registry, parse_ref, pinned_ref

    pinned = pinned_ref(ref, storage_root)
    model, _, version = parse_ref(pinned)
    Registry(storage_root).get(model, version)  # a clear error for a version that is not there
    return pinned


def _root(storage_root: str | None) -> str:
    from runtime.storage import is_remote

    root = storage_root or default_storage_root()
    return root if is_remote(root) else str(Path(root).expanduser().resolve())
