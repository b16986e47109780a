"""A base-model rollout's candidate engine: a Serve application of its own, driven by the saved state.

>>> from runtime.release.engine import ServeApps, engine_turn
>>> new = engine_turn(state, ServeApps())      # in the rollout controller  # doctest: +SKIP

With ``rollout.adapter: null`` the candidate is a new version of the base model, which the
champion's engine cannot serve next to its own weights. So the rollout controller deploys the
Serve app ``<app>-candidate``: the serving spec saved in the state (``serve_spec``) with ``model``
= the pinned candidate, the same ``model_id``, no adapters, no rollout and **no HTTP route**
(only the champion's replicas reach it, through a deployment handle: ``runtime.serving.canary``).

``engine_turn`` is one step of its lifecycle (``runtime.release.state.ENGINE``), a function of the
saved state and what Serve reports, so a restarted controller continues (an app already deployed
is found, not deployed twice):

- ``starting``: deploy the app if Serve has none of that name; once it is RUNNING the state is
  ``running`` and the first step's clock starts; a failed deploy, or no RUNNING within
  ``rollout.candidate_start_timeout_s``, rolls the rollout back naming the engine's error.
- rolled back or aborted: delete the app (Serve drains its in-flight requests).
- promoted (the registry alias has moved): redeploy the champion app from the saved spec, which now
  resolves ``models:/NAME@champion`` to the new version (surging: a new replica starts before an
  old one stops), ``redeploying``; the replicas keep sending the stable id to the candidate app
  until the champion app is RUNNING again (``handed_over``); ``HANDOVER_DRAIN_S`` later (every
  replica re-read the state), the candidate app is deleted.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from runtime.release.state import RolloutState

# After the champion app runs the new version: long enough for every replica to re-read the
# state (2 s) and for requests already forwarded to finish starting, before the app is deleted.
HANDOVER_DRAIN_S = 10.0
# Serve's status right after a redeploy may still be the old version's RUNNING.
REDEPLOY_SETTLE_S = 5.0


class ServeOps(Protocol):
    def status(self, app: str) -> tuple[str, str] | None: ...            # (APP STATUS, message); None: no app
    def deploy_candidate(self, state: RolloutState) -> str: ...          # the candidate's deployment name
    def redeploy_champion(self, state: RolloutState) -> None: ...
    def delete(self, app: str) -> None: ...


def candidate_spec(state: RolloutState):
    """The serving spec of the candidate's app: the champion's, on the pinned candidate."""
    from runtime.specs import parse_spec

    data: dict[str, Any] = {**state.serve_spec, "name": state.candidate_app, "model": state.candidate,
                            "adapters": {}, "rollout": None}
    return parse_spec(data, source=f"rollout {state.name}: candidate app")


def champion_spec(state: RolloutState):
    from runtime.specs import parse_spec

    return parse_spec(dict(state.serve_spec), source=f"rollout {state.name}: champion app")


class ServeApps:
    """``ServeOps`` on the connected Ray cluster's Serve (the controller actor's)."""

    def status(self, app: str) -> tuple[str, str] | None:
        from ray import serve

        st = serve.status().applications.get(app)
        if st is None:
            return None
        state = str(getattr(st, "status", "")).split(".")[-1]
        msg = getattr(st, "message", "") or ""
        for dep in (getattr(st, "deployments", {}) or {}).values():
            if getattr(dep, "message", ""):
                msg = dep.message
        return state, msg

    def deploy_candidate(self, state: RolloutState) -> str:
        from ray import serve

        from runtime.serving.app import build_app

        app = build_app(candidate_spec(state))
        # Not serve.run: it waits for RUNNING even with blocking=False; the state's turns wait instead.
        serve._run(app, name=state.candidate_app, route_prefix=None, _blocking=False)
        return app._bound_deployment.name

    def redeploy_champion(self, state: RolloutState) -> None:
        from ray import serve

        from runtime.serving.app import build_app

        # Surge: the new replica starts before an old one stops, so the app never has none.
        app = build_app(champion_spec(state), deployment_config={"max_surge_percent": 100})
        serve._run(app, name=state.app, route_prefix="/", _blocking=False)

    def delete(self, app: str) -> None:
        from ray import serve

        serve.delete(app, _blocking=False)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


def _rollback(state: RolloutState, reason: str, now: float) -> RolloutState:
    from runtime.release.decide import Decision

    return state.apply(Decision(verdict="rollback", reason=reason, check="candidate_engine", failed=True), now)


def engine_turn(state: RolloutState, ops: ServeOps, now: float | None = None) -> RolloutState | None:
    """The next state of a base rollout's candidate engine, or None when nothing changed."""
    if not state.base or state.engine == "deleted":
        return None
    now = time.time() if now is None else now
    app = state.candidate_app
    if not state.done:
        if state.engine != "starting":
            return None  # running: the decisions go on
        timeout = float(state.config.get("candidate_start_timeout_s", 900.0))
        found = ops.status(app)
        if found is None and state.engine_deployment and now - state.engine_since <= 30:
            return None  # just deployed: Serve may not list it yet
        if found is None:
            if state.engine_deployment and now - state.engine_since > 30:  # deployed and gone: deleted by someone
                return _rollback(state, f"candidate engine (app {app}) disappeared while starting", now)
            try:
                deployment = ops.deploy_candidate(state)
            except Exception as e:  # noqa: BLE001 - a bad model, no resources, no keys: the rollout ends
                return _rollback(state, f"candidate engine (app {app}) failed to deploy: "
                                        f"{type(e).__name__}: {_first_line(e)}", now)
            return state.engine_step("starting", f"candidate engine starting (app {app}, {state.candidate})",
                                     now, engine_deployment=deployment)
        status, message = found
        if status == "RUNNING":
            took = now - state.started_at
            return state.engine_step("running", f"candidate engine running (app {app}, {took:.0f}s after the "
                                                f"start); step 1/{len(state.steps)}: candidate at {state.weight:g}%",
                                     now)
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            return _rollback(state, f"candidate engine (app {app}) is {status}: {_first_line(message)}", now)
        if now - state.engine_since > timeout:
            return _rollback(state, f"candidate engine (app {app}) not RUNNING within candidate_start_timeout_s="
                                    f"{timeout:g}s (it is {status}: {_first_line(message) or 'no message'})", now)
        return None
    if state.state != "promoted" or state.engine == "starting":
        if ops.status(app) is not None:
            ops.delete(app)
        return state.engine_step("deleted", f"candidate app {app} deleted", now)
    if state.engine == "running":
        ops.redeploy_champion(state)
        return state.engine_step("redeploying", f"champion app {state.app} restarting on {state.candidate}; "
                                                f"the candidate app serves {state.model_id} meanwhile", now)
    if state.engine == "redeploying":
        found = ops.status(state.app)
        if found and found[0] == "RUNNING" and now - state.engine_since >= REDEPLOY_SETTLE_S:
            return state.engine_step("handed_over", f"champion app {state.app} runs {state.candidate} "
                                                    f"({now - state.engine_since:.0f}s after the promotion)", now)
        return None
    if state.engine == "handed_over" and now - state.engine_since >= HANDOVER_DRAIN_S:
        if ops.status(app) is not None:
            ops.delete(app)
        return state.engine_step("deleted", f"candidate app {app} deleted", now)
    return None
