"""The serving replicas' supervisor: which rollouts get a controller started on the cluster (the
decision and the once-only refusal; the actor start itself runs in the quickstart's release stage)."""

from __future__ import annotations

import asyncio

import pytest

from runtime.errors import RaylaneError
from runtime.release import supervisor
from runtime.release.state import RolloutState, RolloutStore


def state(controller="cluster", **changes) -> RolloutState:
    import dataclasses

    st = RolloutState.start(name="chat", app="chat", model_id="chat:s", champion="models:/b/1",
                            candidate="models:/b/2", config={"steps": [50, 100], "controller": controller}, now=1.0)
    return dataclasses.replace(st, **changes)


def test_which_rollouts_need_a_controller():
    assert supervisor.needs_controller(state())
    assert supervisor.needs_controller(state(config={"steps": [100]}))  # older states: cluster
    assert not supervisor.needs_controller(state("manual"))
    assert not supervisor.needs_controller(state(state="promoted"))
    assert not supervisor.needs_controller(None)


def test_supervise_starts_once_and_says_a_refusal_once(tmp_path, monkeypatch, caplog):
    calls = []

    def ensure(name, root):
        calls.append(name)
        raise RaylaneError("has checks.quality", hint="drop it")

    monkeypatch.setattr(supervisor, "ensure_controller", ensure)
    RolloutStore(str(tmp_path)).save(state())

    async def run():
        task = asyncio.ensure_future(supervisor.supervise("chat", str(tmp_path), every_s=0.01))
        for _ in range(1000):  # the first turn (a busy machine can be slow)...
            if calls:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # ...then many more turns
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert calls == ["chat"]  # refused: not asked again every turn
    assert "its controller refuses it: has checks.quality" in caplog.text
