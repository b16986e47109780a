"""The serving side of a canary release: requests naming the stable model id of an adapter under
rollout go to the champion or the candidate by the rollout's current weight, sticky per client.

An ASGI middleware inside raylane's guard (so requests are authenticated, validated and rate
limited already), added in one place: ``RaylaneLLMServer.__serve_build_asgi_app__``.

- The rollout state (``runtime.release.state``) is re-read from the storage root at most every
  ``ttl_s`` (2 s), so a weight change or an abort reaches every replica within seconds.
- A candidate request is rewritten to ``<model_id>:<adapter>@<version>`` (a LoRA id of its own,
  loaded from ``models:/NAME/VERSION``; '@' cannot occur in a served id, so a client cannot ask
  for it directly); a champion request keeps the stable id.
- The response says which version served it: ``x-raylane-model-version: models:/NAME/VERSION``
  and ``x-raylane-arm: champion|candidate``.
- Each arm's requests, errors (5xx), TTFT (first body chunk) and end-to-end time are counted per
  step and flushed every ``flush_s`` to the storage root (``runtime.release.windows``).

- The quality probe (``runtime.release.probe``) pins its arm: ``x-raylane-arm: champion|candidate``
  with ``x-raylane-probe: <the rollout's probe token>`` (a secret in the state file only). Pinned
  requests are served but not counted in the arms' windows; a pin without the token is ignored.
- Test-only fault injection: with ``$RAYLANE_TEST_CANARY_FAULTS`` naming a JSON file
  (``{"delay_s": {"candidate": 0.5}}``) in the replica's environment, each live request of that
  arm waits that long before it is served (re-read with the state). Unset (always, in production),
  nothing is read.

- A base-model rollout (``rollout.adapter: null``): the candidate runs in a Serve app of its own
  (``runtime.release.engine``), so a candidate request is forwarded, as it is (the model id is
  the same on both arms), through a deployment handle to that app's ``forward_asgi``, which runs
  it below its own guard (this replica's guard already checked it) and streams the ASGI messages
  back. Nothing goes there before the rollout state says the engine runs; after a promotion every
  request of the stable id goes there until the champion app runs the new version itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable

from runtime.release.arms import choose_arm
from runtime.release.state import RolloutState, RolloutStore
from runtime.release.windows import ArmRecorder
from runtime.serving.guard import read_body, replay_body

log = logging.getLogger(__name__)
STATE_TTL_S = 2.0
FLUSH_S = 2.0
# After a promotion, replicas resolve the registry alias anew within ADAPTER_REFRESH_S (5 s);
# until then the stable id could still reach the old champion, so the candidate keeps serving.
PROMOTED_GRACE_S = 30.0
VERSION_HEADER = b"x-raylane-model-version"
ARM_HEADER = b"x-raylane-arm"
PROBE_HEADER = b"x-raylane-probe"
FAULTS_ENV = "RAYLANE_TEST_CANARY_FAULTS"


def candidate_model_id(state: RolloutState) -> str:
    """The LoRA id the candidate is served under: ``<stable id>@<version>``."""
    return f"{state.model_id}@{state.candidate.rsplit('/', 1)[1]}"


def candidate_ref(adapter: str, adapters: dict[str, str]) -> str | None:
    """``models:/NAME/VERSION`` for a candidate adapter name ``<adapter>@<version>`` whose
    ``adapters[<adapter>]`` is a registry ref of NAME; None for any other name."""
    from runtime.registry import REF_RE

    base, sep, version = adapter.partition("@")
    m = REF_RE.match(adapters.get(base, "")) if sep and version.isdigit() else None
    return f"models:/{m['name']}/{int(version)}" if m else None


class RolloutWatch:
    """The app's progressing rollout, re-read from storage at most every ``ttl_s``."""

    def __init__(self, storage_root: str, app: str, ttl_s: float = STATE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store, self.app, self.ttl_s, self.clock = RolloutStore(storage_root), app, ttl_s, clock
        self._at: float | None = None
        self._state: RolloutState | None = None
        self._faults: dict = {}

    def delay_s(self, arm: str) -> float:
        """The injected delay of ``arm`` (test-only, ``$RAYLANE_TEST_CANARY_FAULTS``); 0 without."""
        return float((self._faults.get("delay_s") or {}).get(arm, 0.0))

    async def current(self) -> RolloutState | None:
        now = self.clock()
        if self._at is None or now - self._at >= self.ttl_s:
            self._at = now
            try:
                self._state = await asyncio.to_thread(self.store.get, self.app)
            except Exception as e:  # storage hiccup: keep serving with what we knew
                log.warning("rollout %s: cannot read its state (%s); keeping the last one", self.app, e)
            self._faults = _read_faults()
        s = self._state
        if s is not None and s.base:
            return s if s.state == "progressing" or forwarding_all(s) else None
        if s is not None and s.state == "promoted" and time.time() - s.updated_at < PROMOTED_GRACE_S:
            return s  # the candidate keeps all traffic until every replica's alias cache has moved on
        return s if s is not None and s.state == "progressing" else None


def forwarding_all(state: RolloutState) -> bool:
    """A promoted base-model rollout whose champion app does not run the new version yet: every
    request of the stable id goes to the candidate app."""
    return state.base and state.state == "promoted" and state.engine in ("running", "redeploying")


# The ASGI scope keys a forwarded request carries: plain values, picklable.
FORWARDED_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                        "root_path", "headers", "client", "server")


def plain_scope(scope) -> dict:
    out = {k: scope[k] for k in FORWARDED_SCOPE_KEYS if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in out.get("headers", [])]
    for k in ("client", "server"):
        if out.get(k) is not None:
            out[k] = tuple(out[k])
    return out


def handle_forwarder():
    """``forward(state, scope, body)``: the ASGI messages of the candidate app serving the request,
    through a streaming deployment handle to its ``forward_asgi`` (one handle per app kept)."""
    handles: dict[tuple[str, str], object] = {}

    async def forward(state: RolloutState, scope: dict, body: bytes):
        from ray import serve

        key = (state.candidate_app, state.engine_deployment)
        if key not in handles:
            handles[key] = serve.get_deployment_handle(state.engine_deployment, app_name=state.candidate_app) \
                .options(stream=True)
        async for message in handles[key].forward_asgi.remote(scope, body):
            yield message

    return forward


def _read_faults() -> dict:
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def pinned_arm(scope, state: RolloutState) -> str | None:
    """The arm a quality-probe request pins (its ``x-raylane-probe`` is the rollout's token); None
    for every other request."""
    headers = {k.lower(): v for k, v in scope.get("headers", [])}
    token, arm = headers.get(PROBE_HEADER), headers.get(ARM_HEADER, b"").decode("latin-1")
    if not token or not state.probe_token or arm not in ("champion", "candidate"):
        return None
    return arm if hmac.compare_digest(token, state.probe_token.encode()) else None


def client_id(scope, body: dict) -> str:
    """Who the client is, for stickiness: its API key's digest, else the body's ``user``, else its address."""
    for k, v in scope.get("headers", []):
        if k.lower() == b"authorization":
            return hashlib.sha256(v.partition(b" ")[2].strip()).hexdigest()[:32]
    if isinstance(body.get("user"), str) and body["user"]:
        return "user:" + body["user"]
    return "addr:" + str((scope.get("client") or ("anonymous", 0))[0])


class CanaryRouter:
    """ASGI middleware; ``ensure(model_id)`` loads an adapter before the app sees the request."""

    def __init__(self, app, *, watch: RolloutWatch, recorder: ArmRecorder,
                 ensure: Callable[[str], Awaitable[None]] | None = None, flush_s: float = FLUSH_S,
                 clock: Callable[[], float] = time.monotonic, forward=None):
        self.app, self.watch, self.recorder, self.ensure = app, watch, recorder, ensure
        self.forward = forward  # base-model rollouts: handle_forwarder() (made on first use)
        self.flush_s, self.clock = flush_s, clock
        self._flushed = clock()
        self._flushing: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        state = await self.watch.current()
        if state is None:
            return await self.app(scope, receive, send)
        body = await read_body(receive, limit=None)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or parsed.get("model") != state.model_id:
            return await self.app(scope, replay_body(body, receive), send)
        if state.base:
            return await self._base(scope, receive, send, state, body, parsed)
        pinned = pinned_arm(scope, state)
        arm = pinned or choose_arm(client_id(scope, parsed), state.rollout_id, state.step, state.weight)
        version = state.champion
        if arm == "candidate":
            version = state.candidate
            served = candidate_model_id(state)
            if self.ensure is not None:
                await self.ensure(served)
            body = json.dumps({**parsed, "model": served}).encode()
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = dict(scope, headers=[*headers, (b"content-length", str(len(body)).encode())])
        await self._serve(scope, replay_body(body, receive), send, state, arm, version, probe=pinned is not None)

    async def _base(self, scope, receive, send, state: RolloutState, body: bytes, parsed: dict):
        """A base-model rollout: the candidate arm is the candidate app, reached by a handle."""
        if not state.live and not forwarding_all(state):  # its engine is not running: no rollout yet
            return await self.app(scope, replay_body(body, receive), send)
        if forwarding_all(state):
            arm, pinned = "candidate", None  # promoted: the new champion serves from there until the handover
        else:
            pinned = pinned_arm(scope, state)
            arm = pinned or choose_arm(client_id(scope, parsed), state.rollout_id, state.step, state.weight)
        if arm == "champion":
            return await self._serve(scope, replay_body(body, receive), send, state, arm, state.champion,
                                     probe=pinned is not None)
        if self.forward is None:
            self.forward = handle_forwarder()
        forward = self.forward

        async def candidate_app(scope, receive, send):
            async for message in forward(state, plain_scope(scope), body):
                await send(message)

        await self._serve(scope, replay_body(body, receive), send, state, arm, state.candidate,
                          probe=pinned is not None or forwarding_all(state), app=candidate_app)

    async def _serve(self, scope, receive, send, state: RolloutState, arm: str, version: str, probe: bool = False,
                     app=None):
        start = self.clock()
        if not probe and self.watch.delay_s(arm):
            await asyncio.sleep(self.watch.delay_s(arm))
        seen = {"status": 500, "ttft": None}
        # The client named the stable id and reads it back in "model" (vLLM echoes the LoRA id).
        # Compact JSON, as vLLM's pydantic responses and Starlette's JSONResponse write it.
        internal = json.dumps({"model": candidate_model_id(state)}, separators=(",", ":"))[1:-1].encode()
        stable = json.dumps({"model": state.model_id}, separators=(",", ":"))[1:-1].encode()

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", [])  # an adapter candidate's body shrinks
                           if arm == "champion" or state.base or k.lower() != b"content-length"]
                message = dict(message, headers=[*headers, (VERSION_HEADER, version.encode()),
                                                 (ARM_HEADER, arm.encode())])
            elif message["type"] == "http.response.body":
                if seen["ttft"] is None and message.get("body"):
                    seen["ttft"] = self.clock() - start
                if arm == "candidate" and not state.base and internal in message.get("body", b""):
                    message = dict(message, body=message["body"].replace(internal, stable))
            await send(message)

        try:
            await (app or self.app)(scope, receive, tagged_send)
        finally:
            if not probe:  # the probe's requests are not live traffic
                self.recorder.record(state.rollout_id, state.step, arm, ok=seen["status"] < 500,
                                     ttft_s=seen["ttft"], e2e_s=self.clock() - start)
                self._maybe_flush()

    def _maybe_flush(self) -> None:
        """Counts reach storage within ``flush_s`` of a request, in one write per replica at a time."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(max(0.0, self.flush_s - (self.clock() - self._flushed)))
        self._flushed = self.clock()
        try:
            await asyncio.to_thread(self.recorder.flush)
        except Exception as e:
            log.warning("rollout %s: cannot write this replica's arm counts (%s)", self.watch.app, e)
