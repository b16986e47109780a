"""Ingress guard for raylane's HTTP endpoints: API keys, per-key rate limit, request ids, and
error bodies without tracebacks. A plain ASGI middleware, so it wraps any FastAPI/Starlette app
(the LLM ingress here, the agent ingress elsewhere) in the same replica: no extra hop.

>>> keys = load_api_keys({"RAYLANE_API_KEYS": "k1,k2"})
>>> sorted(keys)
['k1', 'k2']
>>> app = GuardMiddleware(inner_app, keys=keys, limiter=RateLimiter(600, 60))  # doctest: +SKIP

Keys come from ``RAYLANE_API_KEYS`` (comma-separated) or the file named by
``RAYLANE_API_KEYS_FILE`` (one key per line or comma-separated, e.g. a mounted Kubernetes
secret). The file is re-read when it changes, so rotating the secret needs no redeploy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import AuthNotConfigured

ENV_KEYS = "RAYLANE_API_KEYS"
ENV_KEYS_FILE = "RAYLANE_API_KEYS_FILE"
REQUEST_ID_HEADER = b"x-request-id"
# Paths that must answer without a key (load balancers and Kubernetes probe them).
OPEN_PATHS = ("/-/healthz", "/-/routes", "/health")
# Bodies larger than this are refused before parsing (a prompt is text, not a payload dump).
MAX_BODY_BYTES = 8 * 2**20


def _parse_keys(text: str) -> set[str]:
    return {k.strip() for k in text.replace("\n", ",").split(",") if k.strip() and not k.strip().startswith("#")}


def load_api_keys(environ: Mapping[str, str] | None = None) -> set[str]:
    """The accepted keys; raises ``AuthNotConfigured`` when neither variable is set."""
    env = os.environ if environ is None else environ
    keys: set[str] = set()
    path = env.get(ENV_KEYS_FILE)
    if path:
        try:
            with open(path) as f:
                keys |= _parse_keys(f.read())
        except OSError as e:
            raise AuthNotConfigured(
                f"{ENV_KEYS_FILE}={path} cannot be read: {e.strerror or e}",
                hint="mount the secret at that path or fix the variable",
            ) from None
    keys |= _parse_keys(env.get(ENV_KEYS, ""))
    if not keys:
        raise AuthNotConfigured(
            f"auth is 'api-key' but no API keys are configured ({ENV_KEYS} and {ENV_KEYS_FILE} are unset or empty)",
            hint=f"export {ENV_KEYS}=key1,key2 (or {ENV_KEYS_FILE}=/path/to/keys), or set `auth: none` in the spec "
            "for an open endpoint",
        )
    return keys


class KeySource:
    """Accepted keys, refreshed from ``RAYLANE_API_KEYS_FILE`` when the file changes."""

    def __init__(self, environ: Mapping[str, str] | None = None, check_every_s: float = 5.0):
        self._env = dict(os.environ if environ is None else environ)
        self._keys = load_api_keys(self._env)
        self._path = self._env.get(ENV_KEYS_FILE)
        self._mtime = self._stat()
        self._next_check = time.monotonic() + check_every_s
        self._every = check_every_s

    def _stat(self) -> float | None:
        try:
            return os.stat(self._path).st_mtime if self._path else None
        except OSError:
            return None

    def keys(self) -> set[str]:
        if self._path and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self._every
            mtime = self._stat()
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self._keys = load_api_keys(self._env)
                except AuthNotConfigured:
                    pass  # a half-written secret keeps the previous keys rather than locking everyone out
        return self._keys


@dataclass
class RateLimiter:
    """Token bucket per key: ``burst`` at once, refilled at ``requests_per_minute``."""

    requests_per_minute: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def acquire(self, key: str) -> float:
        """0 if the request may go now, else the seconds until it may (for Retry-After)."""
        rate = self.requests_per_minute / 60.0
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate


class HTTPError(Exception):
    """An OpenAI-style error response raised by a body validator."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}


# A validator sees the parsed JSON body of a POST and raises HTTPError to reject it.
BodyValidator = Callable[[str, Any], None]
# Runs after validation, before the app (e.g. load the LoRA adapter the body names); may raise HTTPError.
BodyHook = Callable[[str, Any], Awaitable[None]]


def error_body(status: int, message: str, type_: str, request_id: str, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": status}, "request_id": request_id}
    ).encode()


# Words in a failed response that mean the engine replica (or its vLLM engine) died mid-request.
_REPLICA_GONE = ("EngineDeadError", "ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorDied", "DeploymentUnavailable",
                 "The actor died", "ray.exceptions")


class GuardMiddleware:
    """ASGI middleware: auth -> rate limit -> body validation -> ``prepare`` -> app; every
    response gets ``x-request-id``; a 5xx body is replaced by a clean message (503 when the
    engine died)."""

    def __init__(
        self,
        app,
        *,
        keys: KeySource | set[str] | None,
        limiter: RateLimiter | None = None,
        validate_body: BodyValidator | None = None,
        prepare: BodyHook | None = None,
        unavailable: Callable[[], bool] | None = None,
    ):
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.validate_body = validate_body
        self.prepare = prepare
        # True once the backend cannot serve (e.g. its engine died): 503 at once, and any 5xx
        # becomes a 503 "retry" rather than a 500.
        self.unavailable = unavailable

    def _accepted(self) -> set[str] | None:
        if self.keys is None:
            return None
        return self.keys.keys() if isinstance(self.keys, KeySource) else self.keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        request_id = (headers.get(REQUEST_ID_HEADER) or b"").decode() or uuid.uuid4().hex
        # Serve's proxy stamps x-request-id on the request and echoes it on the response; add it
        # only where nobody upstream did, so a response never carries it twice.
        stamp = REQUEST_ID_HEADER not in headers
        if stamp:
            scope = dict(scope, headers=[*scope.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())])

        async def reject(err: HTTPError):
            extra = [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
            await _send_json(send, err.status, error_body(err.status, err.message, err.type, request_id, err.param),
                             request_id if stamp else None, extra)

        path = scope.get("path", "")
        key = None
        accepted = self._accepted()
        if accepted is not None and not path.startswith(OPEN_PATHS):
            auth = (headers.get(b"authorization") or b"").decode()
            scheme, _, key = auth.partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or key not in accepted:
                return await reject(HTTPError(
                    401, "missing or invalid API key; send 'Authorization: Bearer <key>'", "authentication_error",
                    headers={"WWW-Authenticate": "Bearer"}))
        if self.limiter is not None and not path.startswith(OPEN_PATHS):
            wait = self.limiter.acquire(key or _client(scope))
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return await reject(HTTPError(
                    429, f"rate limit exceeded for this API key; retry after {retry} s", "rate_limit_error",
                    headers={"Retry-After": str(retry)}))

        if self.unavailable is not None and not path.startswith(OPEN_PATHS) and self.unavailable():
            return await reject(_replica_failed())

        if scope.get("method") == "POST" and self.validate_body is not None:
            body = await _read_body(receive)
            if body is None:
                return await reject(HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes"))
            try:
                try:
                    parsed = json.loads(body) if body else None
                except ValueError as e:
                    raise HTTPError(400, f"request body is not valid JSON: {e}") from None
                self.validate_body(path, parsed)
                if self.prepare is not None:
                    await self.prepare(path, parsed)
            except HTTPError as e:
                return await reject(e)
            except Exception as e:  # a clean 500, the cause goes to the replica log
                logging.getLogger(__name__).exception("request %s: preparing the request failed", request_id)
                return await reject(HTTPError(500, f"internal server error (request id {request_id}): "
                                                   f"{type(e).__name__}", "internal_error"))
            receive = _replay(body, receive)

        await self._call_app(scope, receive, send, request_id, stamp)

    async def _call_app(self, scope, receive, send, request_id: str, stamp: bool = True):
        state = {"started": False, "status": 200, "held": None, "chunks": [], "stamp": stamp}

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                if stamp:
                    hdrs = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                    message = dict(message, headers=[*hdrs, (REQUEST_ID_HEADER, request_id.encode())])
                if message["status"] >= 500:
                    state["held"] = message  # rewrite the body once it is complete
                    return
                state["started"] = True
                return await send(message)
            if message["type"] == "http.response.body" and state["held"] is not None:
                state["chunks"].append(message.get("body", b""))
                if not message.get("more_body"):
                    await self._send_clean_5xx(send, state, request_id)
                return
            return await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as e:
            if state["started"]:
                raise
            state["held"] = state["held"] or {"status": 500}
            state["chunks"].append(f"{type(e).__name__}: {e}".encode())
            await self._send_clean_5xx(send, state, request_id)

    async def _send_clean_5xx(self, send, state, request_id: str):
        text = b"".join(state["chunks"]).decode(errors="replace")
        status = state["held"]["status"]
        if status == 503 or any(w in text for w in _REPLICA_GONE) or (self.unavailable and self.unavailable()):
            err = _replica_failed()
            status, msg, kind = 503, err.message, err.type
            extra = [(b"retry-after", b"1")]
        else:
            msg, kind, extra = "internal server error", "internal_error", []
        state["held"] = None
        state["started"] = True
        await _send_json(send, status, error_body(status, f"{msg} (request id {request_id})", kind, request_id),
                         request_id if state.get("stamp", True) else None, extra)


def _replica_failed() -> HTTPError:
    return HTTPError(503, "the model replica serving this request failed; retry", "service_unavailable",
                     headers={"Retry-After": "1"})


def _client(scope) -> str:
    client = scope.get("client") or ("anonymous", 0)
    return str(client[0])


async def _read_body(receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """The body we already read, then the real channel (so client disconnects still arrive)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send, status: int, body: bytes, request_id: str | None,
                     extra: list[tuple[bytes, bytes]] = ()):
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
