"""Unit tests: the stalled-engine probe (runtime.serving.health). No Ray, no vLLM."""

from __future__ import annotations

import asyncio

import pytest

from runtime.serving.health import EngineStalled, StallDetector


class Engine:
    def __init__(self, clock):
        self.clock, self.last_step, self.stuck, self.probes, self.killed = clock, clock(), False, 0, 0

    async def probe(self):
        self.probes += 1
        if self.stuck:
            await asyncio.sleep(3600)
        self.last_step = self.clock()


def detector(engine, clock, **kw):
    return StallDetector(engine.probe, lambda: engine.last_step, lambda: setattr(engine, "killed", engine.killed + 1),
                         window_s=10, timeout_s=0.05, clock=clock, **kw)


@pytest.mark.anyio
async def test_busy_engine_is_never_probed_and_idle_engine_answers():
    now = [0.0]
    engine = Engine(lambda: now[0])
    d = detector(engine, lambda: now[0])
    for _ in range(5):  # steps keep arriving
        now[0] += 5
        engine.last_step = now[0]
        await d.check()
    assert engine.probes == 0
    now[0] += 30  # idle: no steps, the probe answers
    await d.check()
    await d.check()  # just probed: not again within the window
    assert engine.probes == 1 and not d.stalled


@pytest.mark.anyio
async def test_stuck_engine_fails_every_check_and_is_stopped_once():
    now = [0.0]
    engine = Engine(lambda: now[0])
    d = detector(engine, lambda: now[0])
    engine.stuck = True
    now[0] += 11
    await d.check()  # the first unanswered probe: busy, not yet stalled
    assert not d.stalled and engine.killed == 0
    now[0] += 10
    with pytest.raises(EngineStalled, match="no engine progress on 2 one-token requests"):
        await d.check()
    assert d.stalled and engine.killed == 1
    engine.stuck = False
    for _ in range(2):  # final: Serve counts consecutive failures before replacing the replica
        with pytest.raises(EngineStalled):
            await d.check()
    assert engine.probes == 2 and engine.killed == 1


@pytest.mark.anyio
async def test_an_engine_busy_in_one_long_step_is_not_a_stall():
    """A probe unanswered while the engine is in one long step (a first guided-decoding request
    compiling on CPU), then a step: the count starts anew, nothing is stopped."""
    now = [0.0]
    engine = Engine(lambda: now[0])
    d = detector(engine, lambda: now[0])
    engine.stuck = True
    for _ in range(3):
        now[0] += 11
        await d.check()  # unanswered: busy
        engine.last_step = now[0] + 0.5  # ...then the long step ends
        now[0] += 1
    assert engine.probes == 3 and not d.stalled and engine.killed == 0


@pytest.mark.anyio
async def test_a_probe_that_errors_fails_the_check_without_marking_a_stall():
    now = [0.0]

    async def dead():
        raise RuntimeError("EngineDeadError")

    d = StallDetector(dead, lambda: 0.0, window_s=1, timeout_s=1, clock=lambda: now[0])
    now[0] += 2
    with pytest.raises(RuntimeError, match="EngineDeadError"):
        await d.check()
    assert not d.stalled


def test_bind_host_opens_every_interface_only_where_cross_node_routing_needs_it():
    from runtime.serving.deploy import bind_host

    assert bind_host("127.0.0.1", remote=False, nodes=1, auth="api-key") == ("127.0.0.1", None)
    host, note = bind_host("127.0.0.1", remote=False, nodes=3, auth="api-key")
    assert host == "0.0.0.0" and "3 nodes" in note and "auth stays on" in note
    host, note = bind_host("localhost", remote=True, nodes=1, auth="api-key")
    assert host == "0.0.0.0" and "--address" in note
    host, note = bind_host("127.0.0.1", remote=True, nodes=2, auth="none")
    assert host == "0.0.0.0" and "auth is none" in note and "auth: api-key" in note
    assert bind_host("10.0.0.7", remote=True, nodes=3, auth="api-key") == ("10.0.0.7", None)  # the user's choice
