"""A rollout's durable state: where it is, what it decided, and why; a JSON file per rollout.

>>> from runtime.release.state import RolloutState, RolloutStore
>>> store = RolloutStore("~/.raylane")                      # <root>/rollouts/<name>/state.json
>>> st = store.load("chat")                                  # doctest: +SKIP
>>> st.state, st.step, st.weight                             # doctest: +SKIP
('progressing', 1, 50.0)

The state moves only through ``apply`` (a ``Decision`` from ``runtime.release.decide``) and
``abort``; both return a new state, so a controller can write it before acting on it. Every
decision lands in ``history`` with the step, the per-arm numbers, the verdict and the reason.
A controller that restarts loads the file and continues at the saved step.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from runtime import storage
from runtime.errors import RaylaneError
from runtime.release.decide import ArmWindow, Decision

State = Literal["progressing", "promoted", "rolled_back", "aborted"]
FINAL: tuple[State, ...] = ("promoted", "rolled_back", "aborted")
SCHEMA = 1
# A base-model rollout's candidate engine (the Serve app ``<app>-candidate``), in order:
# starting -> running (live: the router forwards the candidate arm to it) -> on promotion
# redeploying (the champion app restarts on the new version; the stable id still goes to the
# candidate) -> handed_over (the champion app runs it) -> deleted; a rollback or abort: -> deleted.
ENGINE = ("starting", "running", "redeploying", "handed_over", "deleted")


@dataclass(frozen=True)
class RolloutState:
    """One rollout. ``weight`` is the candidate's traffic share in percent (0 once it is over,
    except after a promotion, when the candidate is the champion and takes it all)."""

    name: str
    app: str
    model_id: str
    champion: str
    candidate: str
    steps: list[float]
    config: dict[str, Any]
    rollout_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: State = "progressing"
    step: int = 0
    weight: float = 0.0
    failures: int = 0
    started_at: float = 0.0
    step_started_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""
    baseline: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # The quality probe's secret: a request carrying it may pin its arm (``runtime.serving.canary``).
    # Only the state file (the storage root) has it; status, history and tags never show it.
    probe_token: str = field(default_factory=lambda: secrets.token_hex(16))
    # Base-model rollouts (``rollout.adapter: null``) only: the serving app's spec (dumped; spec
    # files never hold keys), from which the controller builds the candidate's own app and, on
    # promotion, redeploys the champion app; and where that candidate engine is (``ENGINE``).
    serve_spec: dict[str, Any] | None = None
    engine: str = ""
    engine_since: float = 0.0
    engine_deployment: str = ""

    @classmethod
    def start(cls, *, name: str, app: str, model_id: str, champion: str, candidate: str, config: dict,
              now: float | None = None, serve_spec: dict[str, Any] | None = None) -> RolloutState:
        now = time.time() if now is None else now
        steps = [float(s) for s in config["steps"]]
        reason = f"started: step 1/{len(steps)}, candidate {candidate} at {steps[0]:g}%"
        if serve_spec is not None:
            reason = f"started: candidate engine starting (app {app}-candidate, {candidate}); then step 1/{len(steps)}"
        return cls(name=name, app=app, model_id=model_id, champion=champion, candidate=candidate, steps=steps,
                   config=config, weight=steps[0], started_at=now, step_started_at=now, updated_at=now,
                   reason=reason, serve_spec=serve_spec, engine="starting" if serve_spec is not None else "",
                   engine_since=now if serve_spec is not None else 0.0)

    @property
    def base(self) -> bool:
        """A base-model rollout: the candidate is served by an app of its own."""
        return self.serve_spec is not None

    @property
    def winding_down(self) -> bool:
        """A finished base-model rollout whose candidate engine is not gone yet (its app to delete,
        or the champion app to hand over to): its controller still has work."""
        return self.done and self.base and self.engine != "deleted"

    @property
    def candidate_app(self) -> str:
        return f"{self.app}-candidate"

    @property
    def live(self) -> bool:
        """The candidate can take traffic: always for an adapter, once its engine runs for the base model."""
        return not self.base or self.engine == "running"

    def engine_step(self, engine: str, note: str, now: float | None = None, **changes: Any) -> RolloutState:
        """The state with the candidate engine at ``engine`` (recorded in the history and the reason).
        ``running`` while progressing starts the current step's clock: the step begins when traffic can."""
        if engine not in ENGINE:
            raise ValueError(f"unknown candidate engine state {engine!r}")
        now = time.time() if now is None else now
        record = {"at": now, "step": self.step, "weight": self.weight, "verdict": "engine", "engine": engine,
                  "reason": note}
        if engine == "running" and not self.done:
            changes["step_started_at"] = now
        reason = note if not self.done else f"{self.reason}; {note}"
        return replace(self, engine=engine, engine_since=now, updated_at=now, reason=reason,
                       history=[*self.history, record], **changes)

    @property
    def done(self) -> bool:
        return self.state in FINAL

    def elapsed_in_step(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.step_started_at

    def baseline_window(self) -> ArmWindow | None:
        return ArmWindow(**self.baseline) if self.baseline else None

    def apply(self, decision: Decision, now: float | None = None) -> RolloutState:
        """The state after ``decision`` (made for the current step); a finished rollout refuses."""
        if self.done:
            raise RaylaneError(f"rollout {self.name!r} is {self.state}; it takes no more decisions",
                               hint="`raylane rollout start` begins a new one")
        now = time.time() if now is None else now
        record = {"at": now, "step": self.step, "weight": self.weight, **decision.to_dict()}
        changes: dict[str, Any] = {"history": [*self.history, record], "updated_at": now,
                                   "reason": decision.reason, "failures": self.failures + int(decision.failed)}
        champion = decision.arms.get("champion")
        if champion and champion.get("requests"):
            changes["baseline"] = {k: v for k, v in champion.items() if k != "error_rate"}
        if decision.verdict == "advance":
            if self.step + 1 >= len(self.steps):
                raise ValueError("advance past the last step: the last step's pass is a promotion")
            changes.update(step=self.step + 1, weight=self.steps[self.step + 1], step_started_at=now)
        elif decision.verdict == "promote":
            changes.update(state="promoted", weight=100.0)
        elif decision.verdict == "rollback":
            changes.update(state="rolled_back", weight=0.0)
        return replace(self, **changes)

    def abort(self, reason: str = "aborted by hand", now: float | None = None) -> RolloutState:
        if self.done:
            raise RaylaneError(f"rollout {self.name!r} is already {self.state}", hint="nothing to abort")
        now = time.time() if now is None else now
        record = {"at": now, "step": self.step, "weight": self.weight, "verdict": "abort", "reason": reason}
        return replace(self, state="aborted", weight=0.0, reason=reason, updated_at=now,
                       history=[*self.history, record])

    @property
    def arms(self) -> dict[str, dict]:
        """Per-arm numbers of the latest decision ({} before the first)."""
        return next((h["arms"] for h in reversed(self.history) if h.get("arms")), {})

    def summary(self) -> dict[str, Any]:
        """What ``raylane rollout status`` shows: where it is, the latest numbers, and why."""
        return {"name": self.name, "state": self.state, "step": self.step + 1, "steps": self.steps,
                "weight": self.weight, "model_id": self.model_id, "champion": self.champion,
                "candidate": self.candidate, "failures": self.failures, "reason": self.reason,
                "arms": self.arms, "decisions": len(self.history), "updated_at": self.updated_at,
                **({"candidate_app": self.candidate_app, "engine": self.engine} if self.base else {})}

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        data = dict(data)
        if data.pop("schema", SCHEMA) != SCHEMA:
            raise RaylaneError(f"rollout state of schema {data.get('schema')} is not readable by this raylane")
        data.setdefault("probe_token", "")  # written before the probe existed: nothing can pin an arm
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RolloutState:
        return cls.from_dict(json.loads(text))


class RolloutStore:
    """Rollout states under ``<storage root>/rollouts/<name>/state.json`` (local or s3://), each
    written whole and atomically, so a reader (a replica, the CLI, a restarted controller) never
    sees half a file.

    An abort is a file of its own (``abort.json``, naming the rollout id) that every read honours:
    a controller saving a decision at the same moment cannot undo it."""

    def __init__(self, storage_root: str):
        self.storage_root = storage_root
        self.root = storage.join(storage_root, "rollouts")

    def path(self, name: str) -> str:
        return storage.join(self.root, name, "state.json")

    def abort_path(self, name: str) -> str:
        return storage.join(self.root, name, "abort.json")

    def exists(self, name: str) -> bool:
        return storage.exists(self.path(name))

    def get(self, name: str) -> RolloutState | None:
        """The rollout's state (an abort applied), or None when there is none."""
        if not self.exists(name):
            return None
        state = RolloutState.from_json(storage.read_bytes(self.path(name)).decode())
        if not state.done and storage.exists(self.abort_path(name)):
            mark = json.loads(storage.read_bytes(self.abort_path(name)))
            if mark.get("rollout_id") == state.rollout_id:
                state = state.abort(mark.get("reason", "aborted"), now=mark.get("at"))
        return state

    def load(self, name: str) -> RolloutState:
        state = self.get(name)
        if state is None:
            raise RaylaneError(f"no rollout named {name!r} under {self.root}",
                               hint="`raylane rollout start SPEC --candidate REF` starts one")
        return state

    def save(self, state: RolloutState) -> None:
        storage.write_bytes_atomic(self.path(state.name), state.to_json().encode())

    def abort(self, name: str, reason: str) -> RolloutState:
        """Abort rollout ``name``: the marker first (what every reader honours), then the state."""
        state = self.load(name).abort(reason)
        mark = {"rollout_id": state.rollout_id, "reason": reason, "at": state.updated_at}
        storage.write_bytes_atomic(self.abort_path(name), json.dumps(mark).encode())
        self.save(state)
        return state
