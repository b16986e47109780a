"""An engine replica's health beyond "the process answers": a request-path probe, so an engine that
is alive but makes no progress (a hung step, a SIGSTOPped or deadlocked engine process) fails
Serve's health check and is replaced, instead of passing the ping while its requests hang.

>>> detector = StallDetector(probe=one_token_generate, on_stall=kill_engine,      # doctest: +SKIP
...                          last_progress=lambda: stats.last_step)
>>> await detector.check()          # in check_health; raises EngineStalled     # doctest: +SKIP

The engine's stat logger records every engine step; while steps arrive the engine is making
progress and nothing is sent. After ``PROGRESS_WINDOW_S`` without a step (an idle engine, or a
stuck one) the check sends a one-token generate and waits ``PROBE_TIMEOUT_S``: an idle engine
answers in milliseconds, a stuck one never. A healthy engine can also be busy for longer than
that in one step (on CPU, the first guided-decoding request after start compiles for 10 s and
more), so it takes ``STRIKES`` such probes in a row, with no engine step in between, to call it
a stall (about 40 s after the engine stopped). A stall is final: ``on_stall`` runs once (raylane
kills the stuck engine process, so its in-flight requests fail at once with 503 instead of
hanging until Serve replaces the replica) and every later check fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("ray.serve.raylane.health")  # in the replica's log

# No engine step for this long: probe. Serve's check runs every 10 s (config.HEALTH_CHECK_PERIOD_S).
PROGRESS_WINDOW_S = 10.0
# A one-token generate on an idle engine takes milliseconds; well under Serve's 30 s check timeout.
PROBE_TIMEOUT_S = 10.0
# Unanswered probes in a row, with no step in between, that make a stall.
STRIKES = 2


class EngineStalled(RuntimeError):
    """The engine process is alive but made no progress on a one-token request."""


class StallDetector:
    def __init__(self, probe: Callable[[], Awaitable[object]], last_progress: Callable[[], float],
                 on_stall: Callable[[], object] | None = None, *, window_s: float = PROGRESS_WINDOW_S,
                 timeout_s: float = PROBE_TIMEOUT_S, strikes: int = STRIKES,
                 clock: Callable[[], float] = time.monotonic):
        self.probe, self.last_progress, self.on_stall = probe, last_progress, on_stall
        self.window_s, self.timeout_s, self.strikes, self.clock = window_s, timeout_s, strikes, clock
        self.stalled = False
        self.probes = 0
        self._probed_at = clock()
        self._missed: list[float] = []  # last_progress() at each unanswered probe in a row

    async def check(self) -> None:
        if self.stalled:
            raise EngineStalled("the engine made no progress on a one-token request; replacing the replica")
        now = self.clock()
        if now - max(self.last_progress(), self._probed_at) < self.window_s:
            return  # steps are arriving: the engine makes progress
        self.probes += 1
        try:
            await asyncio.wait_for(self.probe(), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            progress = self.last_progress()
            self._missed = [p for p in self._missed if p == progress] + [progress]  # a step in between: anew
            if len(self._missed) < self.strikes:
                log.warning("engine busy: no step for %.0f s and a one-token request got no answer in %.0f s "
                            "(%d of %d before it counts as stalled)", now - progress, self.timeout_s,
                            len(self._missed), self.strikes)
                return
            self.stalled = True
            log.error("engine stalled: no step for %.0f s and a one-token request got no answer in %.0f s; "
                      "failing the health check so Serve replaces this replica", now - self.last_progress(),
                      self.timeout_s)
            if self.on_stall is not None:
                try:
                    self.on_stall()
                except Exception:
                    log.exception("stopping the stalled engine failed")
            raise EngineStalled(f"no engine progress on {self.strikes} one-token requests in a row "
                                f"({self.timeout_s:.0f} s each)") from None
        self._missed = []
        self._probed_at = self.clock()
