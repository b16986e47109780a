"""Session actors: a pool of named async actors, each session routed to one by its id.

>>> router = SessionRouter(app_config)                 # app_config = agent_app_config(spec, ...)  # doctest: +SKIP
>>> s = await router.create(owner=owner_digest("key-a"))                                      # doctest: +SKIP
>>> await router.send(s["id"], "What is 2+2?", owner_digest("key-a"))                         # doctest: +SKIP

Why a pool and not one actor per session: an actor is a process, and 100 idle sessions should
not cost 100 processes. The actors keep nothing but connections: every turn loads the session
from the store and saves it after every step, so when an actor (or the Serve replica that
created it) dies, the router recreates it under the same name and the next message continues
the session from its last saved step. Actors are detached so a restarted Serve replica finds
them by name; their names carry a hash of the config, so a changed spec gets fresh actors.

Sessions are owned: the session actor compares the caller's ``owner`` (a digest of its API key;
None with ``auth: none``) with the one stored at creation, and a mismatch reads as "no such
session", so a key can neither read nor tell apart another key's sessions. Session ids are
random (128 bits) and made here, never chosen by the client.

One turn at a time per session, across every actor and deployment: a turn takes the session's
lease in the store (``LEASE_S``, renewed while it runs) and a second turn meanwhile fails at once
with ``SessionBusy`` (HTTP 409); a lease whose actor died expires and the next turn takes it over
(then settles the cut-off turn). Saves are compare-and-set on the record's revision, so even a
turn whose lease ran out (a stalled actor) cannot overwrite what the next one saved.

A session paused for approval costs nothing but its record in the store: ``decide`` loads it in
whichever actor the id routes to. A turn cut off after a side-effecting call's recorded result
is finished from the record when the session is next loaded (``AgentLoop.settle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import uuid
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from runtime.agents.llm import make_client
from runtime.agents.loop import AgentConfig, AgentLoop, new_session
from runtime.agents.mcptools import McpTools
from runtime.agents.store import SessionConflict, open_store
from runtime.agents.telemetry import AgentMetrics, configure_exporter
from runtime.agents.toolrun import ToolRunner

NAMESPACE = "raylane-agents"
# Test hook: a marker path; the first session actor to record a side-effecting call's result
# after this is set creates the marker and exits before saving the step (the crash window).
CRASH_AFTER_RECORD = "RAYLANE_TEST_CRASH_AFTER_RECORD"


# What a session id may look like (server-made ids are 32 hex characters).
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


# A turn's lease on its session: renewed every LEASE_S / 3 while the turn runs, so a turn whose
# actor died blocks its session for at most LEASE_S.
LEASE_S = 15.0


class SessionNotFound(KeyError):
    pass


class SessionBusy(SessionConflict):
    """Another turn holds the session's lease (it is running now, in this actor or another)."""


def busy_message(session_id: str, lease: dict | None) -> str:
    left = f" for up to {lease['expires_in_s']:.0f} s more" if lease else ""
    return (f"a turn is already running on session {session_id}; retry after it ends (its lease is held{left}; "
            f"GET /sessions/{session_id} shows its progress)")


class SessionQuotaExceeded(Exception):
    pass


class TurnConflict(Exception):
    """The session is no longer at the turn the caller continues from (``after_turn``): another
    request continued it first."""


def owner_digest(api_key: str | None) -> str | None:
    """Who owns a session: the sha256 of the API key that created it (keys never reach the store)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def owned_by(session: dict, owner: str | None) -> bool:
    """A session created with ``auth: none`` (owner None) is reachable only without a key, and
    a keyed one only with its own key: switching a spec's auth never opens old sessions."""
    return hmac.compare_digest(session.get("owner") or "", owner or "")


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
        configure_exporter()
        self.app_config = app_config
        self.config: AgentConfig = app_config["loop"]
        st = app_config["store"]
        self.store = open_store(st["backend"], st["url"], st["run_dir"], app_config["app"])
        self.metrics = AgentMetrics(app_config["app"])
        workers = int(app_config["session_workers"])
        self.mcp = McpTools(app_config.get("mcp_servers") or [], session_workers=workers)
        self.tools = ToolRunner(app_config["tools"], session_workers=workers, mcp=self.mcp)
        self.llm = make_client(app_config["llm"])
        self.loop: AgentLoop | None = None  # built once the MCP servers' tools are known
        self._ready = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._name, self._id = _actor_identity()

    @contextlib.asynccontextmanager
    async def _turn(self, session_id: str):
        """Hold the session's lease (and its lock in this actor) for one turn; ``SessionBusy`` when
        another turn holds it."""
        holder = f"{self._name}|{self._id}|{uuid.uuid4().hex[:12]}"
        if not self.store.acquire(session_id, holder, LEASE_S) and not self._take_over(session_id, holder):
            raise SessionBusy(busy_message(session_id, self.store.lease(session_id)))
        renewer = asyncio.ensure_future(self._renew(session_id, holder))
        try:
            async with self._locks[session_id]:
                yield
        finally:
            renewer.cancel()
            self.store.release(session_id, holder)

    def _take_over(self, session_id: str, holder: str) -> bool:
        """Take the lease from an earlier incarnation of this actor: the same name with another
        actor id means that one is dead (a live actor keeps its name), so its turn is not running
        and the next turn need not wait for its lease to expire."""
        lease = self.store.lease(session_id)
        if lease is None or self._name is None:
            return False
        name, _, rest = lease["holder"].partition("|")
        if name != self._name or rest.partition("|")[0] == self._id:
            return False
        return self.store.take_over(session_id, lease["holder"], holder, LEASE_S)

    async def _renew(self, session_id: str, holder: str) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            if not self.store.renew(session_id, holder, LEASE_S):
                # Stalled past the lease and taken over: this turn's next save is refused (stale
                # revision), so the turn that took over keeps the session.
                logging.getLogger("ray").warning("agent: lost the lease of session %s", session_id)
                return

    def pid(self) -> int:
        return os.getpid()

    async def _loop(self) -> AgentLoop:
        """The loop, after connecting to the MCP servers (their tools join the config here, in the
        worker: a failed start is retried by the next call, never cached)."""
        if self.loop is None:
            async with self._ready:
                if self.loop is None:
                    extra = await self.mcp.start()
                    config = replace(self.config, tools=[*self.config.tools, *extra]) if extra else self.config
                    loop = AgentLoop(config, self.llm, self.tools.call, self.store, self.metrics)
                    if os.environ.get(CRASH_AFTER_RECORD):
                        loop.after_record = _crash_once
                    self.loop = loop
        return self.loop

    async def warm(self) -> int:
        """Start a tool process (or task worker), the MCP servers and the LLM connection before
        the first session needs them (a missing MCP tool fails here, at the agent's start)."""
        await self._loop()
        await self.tools.warm()
        await self.llm.warm()
        return os.getpid()

    async def close(self) -> bool:
        """End the MCP connections (stdio servers exit); ``raylane run`` calls it on exit."""
        await self.mcp.close()
        await self.tools.aclose()
        return True

    def _owned(self, session_id: str, owner: str | None) -> dict:
        session = self.store.load(session_id)
        if session is None or not owned_by(session, owner):
            raise SessionNotFound(session_id)
        return session

    async def _load(self, session_id: str, owner: str | None) -> dict:
        session = self._owned(session_id, owner)
        if session.get("turn_open"):
            # The last turn died with its actor; everything up to its last saved step is kept, and
            # a step cut off after its side-effecting call is finished from the recorded call.
            await (await self._loop()).settle(session)
            session["turn_open"] = False
            session["errors"]["interrupted"] = session["errors"].get("interrupted", 0) + 1
            session["resumed"] = session.get("resumed", 0) + 1
            self.store.save(session)
        return session

    async def create(self, session_id: str, owner: str | None = None, allowed_tools: list[str] | None = None) -> dict:
        """A new session; raises ``SessionQuotaExceeded`` when ``owner`` already holds
        ``max_sessions_per_key`` (never applied to owner None: ``auth: none`` has no key)."""
        session = new_session(session_id, self.config, owner, allowed_tools or ())
        if not self.store.create(session, self.app_config.get("max_sessions_per_key")):
            raise SessionQuotaExceeded(session_id)
        return self.summary(session)

    async def get(self, session_id: str, owner: str | None = None) -> dict:
        session = self._owned(session_id, owner)
        session.pop("owner", None)  # the caller knows its key; the digest stays in the store
        return session

    async def delete(self, session_id: str, owner: str | None = None) -> dict:
        async with self._locks[session_id]:  # not under a running turn, which would save it back
            self.store.delete(self._owned(session_id, owner))
        self._locks.pop(session_id, None)
        return {"id": session_id, "deleted": True}

    async def send(self, session_id: str, content: str, owner: str | None = None,
                   options: dict | None = None) -> dict:
        """``options``: ``AgentLoop.turn``'s keywords (``instructions``, ``max_output_tokens``), and
        ``after_turn``: run only if the session is at that turn (else ``TurnConflict``)."""
        loop = await self._loop()
        options = dict(options or {})
        after = options.pop("after_turn", None)
        async with self._turn(session_id):
            return await loop.send(self._at(await self._load(session_id, owner), after), content, **options)

    async def send_stream(self, session_id: str, content: str, owner: str | None = None,
                          options: dict | None = None) -> AsyncIterator[dict]:
        loop = await self._loop()
        options = dict(options or {})
        after = options.pop("after_turn", None)
        async with self._turn(session_id):
            async for event in loop.turn(self._at(await self._load(session_id, owner), after), content, **options):
                yield event

    @staticmethod
    def _at(session: dict, after_turn: int | None) -> dict:
        if after_turn is not None and session["turn"] != after_turn:
            raise TurnConflict(f"session {session['id']} is at turn {session['turn']}, not {after_turn}")
        return session

    async def decide(self, session_id: str, call_id: str, decision: str, arguments: dict | None = None,
                     reason: str | None = None, owner: str | None = None) -> dict:
        """Approve or reject the session's pending call and continue its turn; returns the reply
        record. Raises ``ApprovalError`` (409: nothing pending or another call; 400: arguments
        outside the tool's schema). Repeating it after the actor died finishes the same call once."""
        loop = await self._loop()
        async with self._turn(session_id):
            session = await self._load(session_id, owner)
            loop.check_decision(session, call_id, decision, arguments)
            reply: dict = {}
            async for event in loop.resolve(session, call_id, decision, arguments, reason):
                reply = event
            return reply

    def stats(self) -> dict:
        return self.metrics.snapshot()

    @staticmethod
    def summary(session: dict) -> dict:
        return {"id": session["id"], "status": session["status"], "end_reason": session["end_reason"],
                "turn": session["turn"], "usage": session["usage"], "allowed_tools": session.get("allowed_tools", [])}


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

    async def create(self, owner: str | None = None, allowed_tools: list[str] | None = None) -> dict:
        import uuid

        sid = uuid.uuid4().hex  # made here: a client never picks (or guesses) an id
        return await self._call(sid, "create", sid, owner, allowed_tools)

    async def get(self, session_id: str, owner: str | None = None) -> dict:
        return await self._call(session_id, "get", session_id, owner)

    async def delete(self, session_id: str, owner: str | None = None) -> dict:
        return await self._call(session_id, "delete", session_id, owner)

    async def send(self, session_id: str, content: str, owner: str | None = None,
                   options: dict | None = None) -> dict:
        # A send is retried only when the actor was already dead before it started the turn
        # (nothing appended): Ray raises ActorDiedError before running the method then too, so
        # we check the session store to tell the cases apart instead of risking a duplicate turn.
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        before = await self._call(session_id, "get", session_id, owner)
        try:
            return await self.worker(session_id).send.remote(session_id, content, owner, options)
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            self._handles.pop(self.index(session_id), None)
            after = await self._call(session_id, "get", session_id, owner)
            if after["turn"] == before["turn"]:
                return await self.worker(session_id).send.remote(session_id, content, owner, options)
            raise

    async def decide(self, session_id: str, call_id: str, decision: str, arguments: dict | None = None,
                     reason: str | None = None, owner: str | None = None) -> dict:
        """``POST /sessions/ID/approvals``: safe to retry when the actor dies mid-call (the
        decision and the call's result are in the store; the call does not run twice)."""
        return await self._call(session_id, "decide", session_id, call_id, decision, arguments, reason, owner)

    async def send_stream(self, session_id: str, content: str, owner: str | None = None,
                          options: dict | None = None) -> AsyncIterator[dict]:
        await self._call(session_id, "get", session_id, owner)  # a missing session fails before streaming
        gen = self.worker(session_id).send_stream.options(num_returns="streaming").remote(session_id, content, owner,
                                                                                          options)
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
        """Start every session actor, its tool process and the LLM connection: no cold start on the first messages."""
        import uuid

        import ray

        refs = []
        for i in range(len(self.names)):
            sid = next(s for s in (uuid.uuid4().hex for _ in range(10_000)) if self.index(s) == i)
            refs.append(self.worker(sid).warm.remote())
        return ray.get(refs, timeout=timeout_s)

    def kill_actors(self) -> None:
        """Remove this app's detached actors (``raylane run`` does it on exit)."""
        close_and_kill(*self.names)
        self._handles.clear()


def close_and_kill(*names: str, timeout_s: float = 15) -> None:
    """Kill session actors, closing their MCP connections first (their stdio servers would also
    exit when they die: their stdin closes). All close at once; a dead or stuck one (no answer
    within ``timeout_s``) is killed all the same."""
    import ray

    actors = []
    for name in names:
        try:
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # never created, or already gone
            pass
    closing = [a.close.remote() for a in actors]
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _actor_identity() -> tuple[str | None, str]:
    """(this actor's name, its id) inside a Ray actor; (None, host:pid) elsewhere (tests, notebooks)."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            actor_id = ctx.get_actor_id()
            if actor_id:
                return ctx.get_actor_name() or None, actor_id
    except Exception:  # noqa: BLE001, S110 - no Ray here: an identity that never takes over
        pass
    return None, f"{socket.gethostname()}:{os.getpid()}"


def _forwarded_env() -> dict[str, str]:
    """Settings session actors need from the process that creates them."""
    keys = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "HF_HUB_OFFLINE", CRASH_AFTER_RECORD)
    return {k: os.environ[k] for k in keys if k in os.environ}


def _crash_once(session: dict, key: str) -> None:
    marker = os.environ.get(CRASH_AFTER_RECORD)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except (FileExistsError, TypeError):
        return
    os.write(fd, key.encode())
    os.close(fd)
    os._exit(1)
