"""Session actors: a pool of named async actors, each session routed to one by its id.

>>> router = SessionRouter(app_config)                 # app_config = agent_app_config(spec, ...)  # doctest: +SKIP
>>> s = await router.create()                                                                 # doctest: +SKIP
>>> await router.send(s["id"], "What is 2+2?")                                                # doctest: +SKIP

Why a pool and not one actor per session: an actor is a process, and 100 idle sessions should
not cost 100 processes. The actors keep nothing but connections: every turn loads the session
from the store and saves it after every step, so when an actor (or the Serve replica that
created it) dies, the router recreates it under the same name and the next message continues
the session from its last saved step. Actors are detached so a restarted Serve replica finds
them by name; their names carry a hash of the config, so a changed spec gets fresh actors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

NAMESPACE = "raylane-agents"


class SessionNotFound(KeyError):
    pass


def config_hash(app_config: dict) -> str:
    return hashlib.sha1(json.dumps(app_config, sort_keys=True, default=str).encode()).hexdigest()[:8]


def actor_names(app_config: dict) -> list[str]:
    """The session actors' names for this app config."""
    base = f"{app_config['app']}-{config_hash(app_config)}"
    return [f"{base}-session-{i}" for i in range(int(app_config["session_workers"]))]


class SessionWorkerImpl:
    """Runs turns for the sessions routed to it (async actor: many sessions at once, one turn
    at a time per session)."""

    def __init__(self, app_config: dict):
        from runtime.agents.llm import make_client
        from runtime.agents.loop import AgentConfig, AgentLoop
        from runtime.agents.store import open_store
        from runtime.agents.telemetry import AgentMetrics, configure_exporter
        from runtime.agents.toolrun import ToolRunner

        configure_exporter()
        self.app_config = app_config
        self.config: AgentConfig = app_config["loop"]
        st = app_config["store"]
        self.store = open_store(st["backend"], st["url"], st["run_dir"], app_config["app"])
        self.metrics = AgentMetrics(app_config["app"])
        self.tools = ToolRunner(app_config["tools"], session_workers=int(app_config["session_workers"]))
        self.loop = AgentLoop(self.config, make_client(app_config["llm"]), self.tools.call, self.store, self.metrics)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def pid(self) -> int:
        return os.getpid()

    async def warm(self) -> int:
        """Start a tool task worker and connect to the LLM before the first session needs them."""
        await self.tools.warm()
        await self.loop.llm.warm()
        return os.getpid()

    def _load(self, session_id: str) -> dict:
        session = self.store.load(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        if session.get("turn_open"):
            # The last turn died with its actor; everything up to its last saved step is kept.
            session["turn_open"] = False
            session["errors"]["interrupted"] = session["errors"].get("interrupted", 0) + 1
            session["resumed"] = session.get("resumed", 0) + 1
            self.store.save(session)
        return session

    async def create(self, session_id: str | None = None) -> dict:
        from runtime.agents.loop import new_session

        if session_id and self.store.load(session_id) is not None:
            return self.summary(self.store.load(session_id))
        session = new_session(session_id, self.config)
        self.store.save(session)
        return self.summary(session)

    async def get(self, session_id: str) -> dict:
        session = self.store.load(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    async def send(self, session_id: str, content: str) -> dict:
        async with self._locks[session_id]:
            return await self.loop.send(self._load(session_id), content)

    async def send_stream(self, session_id: str, content: str) -> AsyncIterator[dict]:
        async with self._locks[session_id]:
            async for event in self.loop.turn(self._load(session_id), content):
                yield event

    def stats(self) -> dict:
        return self.metrics.snapshot()

    @staticmethod
    def summary(session: dict) -> dict:
        return {"id": session["id"], "status": session["status"], "end_reason": session["end_reason"],
                "turn": session["turn"], "usage": session["usage"]}


class SessionRouter:
    """Finds (or creates) the session actor for a session id; used by the Serve ingress and by
    ``AgentSession`` in notebooks. Safe to have many routers (one per ingress replica)."""

    def __init__(self, app_config: dict):
        self.app_config = app_config
        self.names = actor_names(app_config)
        self._handles: dict[int, Any] = {}

    def index(self, session_id: str) -> int:
        return zlib.crc32(session_id.encode()) % len(self.names)

    def worker(self, session_id: str):
        i = self.index(session_id)
        if i not in self._handles:
            import ray

            cls = ray.remote(SessionWorkerImpl)
            self._handles[i] = cls.options(
                name=self.names[i], namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                num_cpus=0, max_concurrency=1000,
                runtime_env={"env_vars": _forwarded_env()},
            ).remote(self.app_config)
        return self._handles[i]

    async def _call(self, session_id: str, method: str, *args, retry: bool = True):
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(2):
            try:
                return await getattr(self.worker(session_id), method).remote(*args)
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                self._handles.pop(self.index(session_id), None)
                if attempt or not retry:
                    raise
                await asyncio.sleep(0.2)

    async def create(self, session_id: str | None = None) -> dict:
        import uuid

        sid = session_id or uuid.uuid4().hex
        return await self._call(sid, "create", sid)

    async def get(self, session_id: str) -> dict:
        return await self._call(session_id, "get", session_id)

    async def send(self, session_id: str, content: str) -> dict:
        # A send is retried only when the actor was already dead before it started the turn
        # (nothing appended): Ray raises ActorDiedError before running the method then too, so
        # we check the session store to tell the cases apart instead of risking a duplicate turn.
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        before = await self._call(session_id, "get", session_id)
        try:
            return await self.worker(session_id).send.remote(session_id, content)
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            self._handles.pop(self.index(session_id), None)
            after = await self._call(session_id, "get", session_id)
            if after["turn"] == before["turn"]:
                return await self.worker(session_id).send.remote(session_id, content)
            raise

    async def send_stream(self, session_id: str, content: str) -> AsyncIterator[dict]:
        await self._call(session_id, "get", session_id)  # a missing session fails before streaming
        gen = self.worker(session_id).send_stream.options(num_returns="streaming").remote(session_id, content)
        async for ref in gen:
            yield await ref

    async def stats(self) -> dict:
        """Metrics summed over this app's live session actors."""
        import ray

        total: dict[str, Any] = {}
        for name in self.names:
            try:
                snap = await ray.get_actor(name, namespace=NAMESPACE).stats.remote()
            except Exception:  # not created yet, or dead: it has no counts to add
                continue
            for k, v in snap.items():
                if isinstance(v, (int, float)) and k != "tool_success_rate":
                    total[k] = total.get(k, 0) + v
        ok = sum(v for k, v in total.items() if k.startswith("tool_calls:") and k.endswith(":ok"))
        calls = sum(v for k, v in total.items() if k.startswith("tool_calls:"))
        total["tool_success_rate"] = round(ok / calls, 4) if calls else None
        return total

    def warm(self, timeout_s: float = 120) -> list[int]:
        """Start every session actor, a tool task worker and the LLM connection: no cold start on the first messages."""
        import uuid

        import ray

        refs = []
        for i in range(len(self.names)):
            sid = next(s for s in (uuid.uuid4().hex for _ in range(10_000)) if self.index(s) == i)
            refs.append(self.worker(sid).warm.remote())
        return ray.get(refs, timeout=timeout_s)

    def kill_actors(self) -> None:
        """Remove this app's detached actors (``raylane run`` does it on exit)."""
        import ray

        for name in self.names:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
        self._handles.clear()


def _forwarded_env() -> dict[str, str]:
    """Settings session actors need from the process that creates them."""
    keys = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "HF_HUB_OFFLINE")
    return {k: os.environ[k] for k in keys if k in os.environ}
