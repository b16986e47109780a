"""Unit tier (no Ray, no engine): one turn at a time per session. The revision check on save
(two writers racing: one wins, the other gets a clear conflict, no usage lost) and the per-session
lease (a second turn is refused, an expired lease is taken over), on both real stores (SQLite and a
real redis-server); then the same through session workers, with a scripted model held mid-step."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest

from runtime.agents import worker as worker_mod
from runtime.agents.llm import LLMReply
from runtime.agents.loop import AgentLoop, new_session
from runtime.agents.store import RedisStore, SessionConflict, SQLiteStore
from tests.agent.test_agent_approval import BUDGETS


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return SQLiteStore(tmp_path / "sessions.db")
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=f"raylane:t{uuid.uuid4().hex[:8]}:session")


def _config():
    from runtime.agents.loop import AgentConfig

    return AgentConfig("t", "sys", [], BUDGETS)


def test_two_writers_racing_one_wins_and_the_other_gets_a_clear_conflict(store):
    assert store.create(new_session("s1", _config()))
    a, b = store.load("s1"), store.load("s1")  # two requests loaded the same revision
    assert a["rev"] == b["rev"] == 1
    a["usage"]["steps"] += 3
    store.save(a)
    assert a["rev"] == 2
    b["usage"]["steps"] += 1
    with pytest.raises(SessionConflict, match=r"saved by another request .*revision 2, not 1.*nothing was saved"):
        store.save(b)
    saved = store.load("s1")
    assert saved["usage"]["steps"] == 3 and saved["rev"] == 2  # the winner's usage stands
    saved["usage"]["steps"] += 1  # the loser reloads and redoes its change
    store.save(saved)
    assert store.load("s1")["usage"]["steps"] == 4 and store.load("s1")["rev"] == 3


def test_a_new_record_never_overwrites_and_a_deleted_one_is_not_brought_back(store):
    store.save(new_session("fresh", _config()))  # never stored: inserted
    with pytest.raises(SessionConflict, match="already exists"):
        store.save(new_session("fresh", _config()))
    s = store.load("fresh")
    store.delete(s)
    with pytest.raises(SessionConflict, match="was deleted"):
        store.save(s)
    assert store.load("fresh") is None


def test_budget_usage_is_never_lost_under_concurrent_writers(store):
    store.create(new_session("busy", _config()))
    writers, each = 4, 25
    conflicts = []

    def add_steps():
        for _ in range(each):
            while True:
                s = store.load("busy")
                s["usage"]["steps"] += 1
                s["usage"]["tokens"] += 10
                try:
                    store.save(s)
                    break
                except SessionConflict:
                    conflicts.append(1)

    threads = [threading.Thread(target=add_steps) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    u = store.load("busy")["usage"]
    assert u["steps"] == writers * each and u["tokens"] == 10 * writers * each
    assert store.load("busy")["rev"] == 1 + writers * each


def test_the_lease_admits_one_holder_and_an_expired_one_is_taken_over(store):
    assert store.acquire("s1", "a", 0.4)
    assert store.acquire("s1", "a", 0.4)  # the holder itself may take it again
    assert not store.acquire("s1", "b", 0.4)
    held = store.lease("s1")
    assert held["holder"] == "a" and 0 < held["expires_in_s"] <= 0.4
    assert not store.renew("s1", "b", 0.4) and store.renew("s1", "a", 0.4)
    time.sleep(0.5)  # "a" died: its lease runs out
    assert store.lease("s1") is None
    assert store.acquire("s1", "b", 5)
    assert not store.renew("s1", "a", 5)  # the old holder learns it lost the lease
    store.release("s1", "a")  # not a's to release
    assert store.lease("s1")["holder"] == "b"
    store.release("s1", "b")
    assert store.lease("s1") is None and store.acquire("s1", "c", 5)
    assert not store.take_over("s1", "b", "d", 5)  # only from the holder named
    assert store.take_over("s1", "c", "d", 5) and store.lease("s1")["holder"] == "d"


class Held:
    """A scripted model whose first reply waits until ``go`` is set (a turn held mid-step)."""

    def __init__(self):
        self.entered, self.go = asyncio.Event(), asyncio.Event()
        self.calls = 0

    async def chat(self, messages, **_):
        self.calls += 1
        self.entered.set()
        await self.go.wait()
        return LLMReply(json.dumps({"answer": "ok"}), 10, 5, 0.001)


def _worker(store_url: str, llm) -> worker_mod.SessionWorkerImpl:
    from runtime.agents.config import agent_app_config
    from runtime.specs import parse_spec

    spec = parse_spec({"kind": "Agent", "name": "t", "auth": "none", "llm": {"url": "http://127.0.0.1:9/v1"},
                       "tools": [], "sessions": {"backend": "sqlite", "url": store_url}})
    w = worker_mod.SessionWorkerImpl(agent_app_config(spec, [], None))
    w.loop = AgentLoop(w.config, llm, w.tools.call, w.store, w.metrics)
    return w


def test_a_second_turn_on_a_session_is_refused_in_any_actor_and_a_dead_holders_lease_is_taken_over(
        tmp_path, monkeypatch):
    db = str(tmp_path / "sessions.db")
    llm = Held()
    one, other = _worker(db, llm), _worker(db, llm)  # two actors (or two deployments) on one store

    async def scenario():
        sid = (await one.create("s1"))["id"]
        first = asyncio.ensure_future(one.send(sid, "first"))
        await asyncio.wait_for(llm.entered.wait(), 10)
        for w in (one, other):  # the same actor (a retried request) and another one
            with pytest.raises(worker_mod.SessionBusy, match="a turn is already running on session s1; retry after"):
                await w.send(sid, "second")
        llm.go.set()
        reply = await first
        assert reply["reply"] == "ok" and reply["turn"] == 1
        assert (await other.send(sid, "third"))["turn"] == 2  # free again once the turn ended
        # A holder that died mid-turn: its lease blocks the session until it expires, then the
        # next turn takes it over and settles the cut-off turn.
        s = one.store.load(sid)
        s.update(turn_open=True)
        one.store.save(s)
        one.store.acquire(sid, "dead-actor", 0.3)
        with pytest.raises(worker_mod.SessionBusy):
            await other.send(sid, "too soon")
        await asyncio.sleep(0.35)
        reply = await other.send(sid, "after it expired")
        return reply, other.store.load(sid)

    reply, saved = asyncio.run(scenario())
    assert reply["turn"] == 3 and reply["reply"] == "ok"
    assert saved["errors"]["interrupted"] == 1 and saved["usage"]["steps"] == 3 and llm.calls == 3
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["first", "third", "after it expired"]
    assert one.store.lease(saved["id"]) is None  # released at the end of the turn


def test_a_turn_keeps_its_lease_while_it_runs_past_the_ttl(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_mod, "LEASE_S", 0.3)  # renewed every 0.1 s
    llm = Held()
    one, other = _worker(str(tmp_path / "sessions.db"), llm), _worker(str(tmp_path / "sessions.db"), llm)

    async def scenario():
        sid = (await one.create("s1"))["id"]
        first = asyncio.ensure_future(one.send(sid, "slow"))
        await asyncio.wait_for(llm.entered.wait(), 10)
        await asyncio.sleep(1.0)  # three lease lifetimes
        with pytest.raises(worker_mod.SessionBusy):
            await other.send(sid, "meanwhile")
        llm.go.set()
        return await first

    assert asyncio.run(scenario())["reply"] == "ok"


def test_a_recreated_actor_takes_over_its_dead_incarnations_lease_at_once(tmp_path):
    """A session actor died mid-turn and Ray recreated it under the same name: the next turn need
    not wait out the lease (a live actor keeps its name, so the old one is dead). An actor of
    another deployment (another name) still waits for it to expire."""
    llm = Held()
    llm.go.set()
    w = _worker(str(tmp_path / "sessions.db"), llm)
    w._name, w._id = "t-abc-session-0", "actor-2"

    async def scenario():
        sid = (await w.create("s1"))["id"]
        w.store.acquire(sid, "t-abc-session-0|actor-1|tok", 60)  # the dead incarnation
        first = await w.send(sid, "after the restart")
        w.store.acquire(sid, "t-new-session-0|actor-9|tok", 60)  # a live actor of another deployment
        with pytest.raises(worker_mod.SessionBusy, match="for up to 60 s more"):
            await w.send(sid, "blocked")
        return first

    assert asyncio.run(scenario())["reply"] == "ok"
