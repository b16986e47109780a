"""The rollout controller: a detached Ray actor that decides a rollout's steps on the cluster.

>>> from runtime.release.controller import start_controller
>>> start_controller("chat", "/mnt/raylane")            # needs ray.init(address=...) first  # doctest: +SKIP

Every ``interval_s`` it reads the saved state, adds up the replicas' per-arm windows of the
current step (``runtime.release.windows``), adds the quality probe's scores of the step (probed
once per step through the live endpoint, ``runtime.release.probe``), and applies one decision (``rollout_evaluate``):
the new weight reaches the replicas through the state file, a promotion moves the registry
alias. It keeps nothing in memory that the state file does not have, so a controller that is
killed and started again (or restarted by Ray: ``max_restarts=-1``) continues at the saved
step. It exits once the rollout is promoted, rolled back or aborted.
"""

from __future__ import annotations

import logging
import threading
import time

from runtime.errors import RaylaneError

NAMESPACE = "raylane"
log = logging.getLogger(__name__)


def actor_name(rollout: str) -> str:
    return f"raylane-rollout-{rollout}"


class RolloutController:
    """The actor class (``ray.remote`` is applied in ``start_controller``, so this module
    imports without Ray). The loop runs in a thread started by ``__init__``, so a restarted
    actor resumes on its own."""

    def __init__(self, name: str, storage_root: str):
        self.name, self.storage_root = name, storage_root
        self.turns = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._again = False
        self._serve = None  # runtime.release.engine.ServeApps, made in the loop's thread
        self._finished: str | None = None  # the rollout whose registry side this controller finished
        self._thread = threading.Thread(target=self._loop, name=f"rollout-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from runtime.release import finish, rollout_evaluate, rollout_status
        from runtime.release.windows import read_windows

        while not self._stop.is_set():
            interval = 5.0
            self.error = None
            try:
                state = rollout_status(self.name, self.storage_root)
                interval = float(state.config.get("interval_s", 30.0))
                if state.done:
                    if self._finished != state.rollout_id:  # a predecessor may have died before the registry moved
                        finish(state, self.storage_root)
                        self._finished = state.rollout_id
                    if state.winding_down:
                        self._engine(state)
                        interval = min(interval, 2.0)
                        self._stop.wait(interval)
                        continue
                    with self._lock:
                        if not self._again:
                            return
                        self._again = False
                    continue
                if not state.live:  # a base rollout whose candidate engine is not running yet
                    self._engine(state)
                    self._stop.wait(min(interval, 2.0))
                    continue
                windows = read_windows(self.storage_root, state.app, state.rollout_id, state.step)
                windows = self._with_quality(state, windows)
                rollout_evaluate(self.name, windows["champion"], windows["candidate"],
                                 storage_root=self.storage_root)
                self.turns += 1
            except Exception as e:  # storage, registry or probe hiccup: try again next turn (within 5 s)
                self.error = f"{type(e).__name__}: {e}"
                log.warning("rollout %s: %s", self.name, self.error)
                interval = min(interval, 5.0)
            self._stop.wait(interval)

    def _engine(self, state) -> None:
        """One step of a base rollout's candidate engine (``runtime.release.engine``), saved before
        the next turn reads it; a rollout it rolls back gets its registry record."""
        from runtime.release import finish
        from runtime.release.engine import ServeApps, engine_turn
        from runtime.release.state import RolloutStore

        if self._serve is None:
            self._serve = ServeApps()
        new = engine_turn(state, self._serve)
        if new is None:
            return
        store = RolloutStore(self.storage_root)
        current = store.get(self.name)
        if current is None or current.rollout_id != state.rollout_id:
            return  # a new rollout replaced it meanwhile
        if current.done and not state.done:  # aborted meanwhile: the abort wins; wind down next turn
            return
        store.save(new)
        if new.done and not state.done:
            finish(new, self.storage_root)
            self._finished = new.rollout_id

    def _with_quality(self, state, windows: dict) -> dict:
        """``windows`` with the step's quality probe scores (none configured: as they are)."""
        import dataclasses

        from runtime.release.probe import probe_api_key, step_scores
        from runtime.specs.serving import RolloutSpec

        quality = RolloutSpec.model_validate(state.config).checks.quality
        if quality is None:
            return windows
        try:
            scores = step_scores(self.storage_root, state, quality, api_key=probe_api_key())
        except RaylaneError as e:  # no score: the step is inconclusive (held, then per on_low_traffic)
            self.error = str(e)
            log.warning("rollout %s: %s", self.name, e)
            return windows
        return {arm: dataclasses.replace(w, quality=scores[arm]) for arm, w in windows.items()}

    def ensure_running(self) -> dict:
        """Restart the loop if it ended (its rollout finished): the app's next rollout reuses this
        actor, which ``get_if_exists`` hands back."""
        with self._lock:
            if self._thread.is_alive():
                self._again = True  # a loop that just saw the old rollout finished goes on
            else:
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name=f"rollout-{self.name}", daemon=True)
                self._thread.start()
        return self.info()

    def info(self) -> dict:
        return {"name": self.name, "turns": self.turns, "running": self._thread.is_alive(), "error": self.error}

    def stop(self) -> None:
        self._stop.set()


def start_controller(name: str, storage_root: str):
    """The controller actor of rollout ``name`` on the connected Ray cluster (the running one
    if there is one)."""
    import ray

    from runtime.release import rollout_status

    state = rollout_status(name, storage_root)
    if state.done and not state.winding_down:
        raise RaylaneError(f"rollout {name!r} is {state.state}; there is nothing to control")
    if not ray.is_initialized():
        raise RaylaneError("no Ray cluster connected", hint="ray.init(address=...) or runtime.init_ray(address)")
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from runtime.serving.keys import replica_key_env

    # The quality probe is a client of the app: it finds an API key the way replicas do (only a
    # file path ever travels, never a key value).
    # Started by a serving replica (runtime.release.supervisor), it would land in that replica's
    # engine placement group (Serve's captures child tasks) and die with it when the replica is
    # replaced (a champion redeploy, a scale-down): placement_group=None keeps it out.
    actor = ray.remote(RolloutController).options(
        name=actor_name(name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=0, runtime_env={"env_vars": replica_key_env()},
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    handle = actor.remote(name, storage_root)
    ray.get(handle.ensure_running.remote())  # started, or already running (an earlier rollout's: going again)
    return handle


def wait_done(name: str, storage_root: str, timeout_s: float, poll_s: float = 0.5):
    """The rollout's state once it is over (or at the timeout)."""
    from runtime.release import rollout_status

    deadline = time.monotonic() + timeout_s
    state = rollout_status(name, storage_root)
    while not state.done and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = rollout_status(name, storage_root)
    return state
