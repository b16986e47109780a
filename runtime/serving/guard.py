"""Ingress guard for raylane's HTTP endpoints: API keys (``runtime.serving.keys``), a route
allow-list, per-key rate limit, failed-login limit per client, request ids, and error bodies
without tracebacks. A plain ASGI middleware, so it wraps any FastAPI/Starlette app (the LLM
ingress here, the agent ingress elsewhere) in the same replica: no extra hop.

>>> from runtime.serving.keys import load_api_keys
>>> keys = load_api_keys({"RAYLANE_API_KEYS": "k1,k2"})
>>> app = GuardMiddleware(inner_app, keys=keys, limiter=RateLimiter(600, 60))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from runtime.serving.keys import KeySource, StaticKeys

REQUEST_ID_HEADER = b"x-request-id"
# A client-sent request id is kept only when it looks like one (it lands in logs and headers).
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths that must answer without a key (load balancers and Kubernetes probe them): exact match.
OPEN_PATHS = frozenset({"/-/healthz", "/-/routes", "/health"})
# Bodies larger than this are refused before parsing (a prompt is text, not a payload dump).
MAX_BODY_BYTES = 8 * 2**20
# Deeper JSON than this is refused (no OpenAI request nests beyond a handful of levels).
MAX_JSON_DEPTH = 64
# Failed authentications a client may make at once, and refilled per minute, before every
# request from it gets 429 (checked before the key, so a locked-out guesser learns nothing).
AUTH_FAILURE_BURST = 30
AUTH_FAILURES_PER_MINUTE = 30
# Rate-limit buckets kept per limiter; beyond this the least recently used are dropped.
MAX_BUCKETS = 65536

log = logging.getLogger(__name__)




class RateLimiter:
    """Token bucket per key: ``burst`` at once, refilled at ``requests_per_minute``. Holds at
    most ``max_buckets`` buckets (least recently used dropped first; a bucket idle long enough
    to be full again is the same as no bucket, so idle ones go as they are passed over)."""

    def __init__(self, requests_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = MAX_BUCKETS):
        self.requests_per_minute, self.burst, self.clock = requests_per_minute, burst, clock
        self.max_buckets = max_buckets
        self._rate = requests_per_minute / 60.0
        self._full_after = burst / self._rate  # seconds for an empty bucket to refill
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self._rate)

    def blocked(self, key: str) -> float:
        """Like ``acquire`` but takes nothing: 0 if a request may go now, else the wait."""
        tokens = self._tokens(key, self.clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def acquire(self, key: str) -> float:
        """0 if the request may go now, else the seconds until it may (for Retry-After)."""
        return self.take(key)[1]

    def take(self, key: str, want: int = 1, returned: int = 0) -> tuple[int, float]:
        """Up to ``want`` whole tokens at once, after adding back ``returned`` unused ones (a
        replica's lease, ``runtime.serving.ratelimit``): (granted, 0) or (0, seconds to wait)."""
        now = self.clock()
        tokens = min(float(self.burst), self._tokens(key, now) + returned)
        granted = min(want, int(tokens))
        tokens -= granted
        wait = 0.0 if granted else (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._evict(now)
        return granted, wait

    def _evict(self, now: float) -> None:
        for _ in range(2):  # amortised: the oldest two per call, so idle buckets never pile up
            oldest = next(iter(self._buckets.items()), None)
            if oldest is None or now - oldest[1][1] < self._full_after:
                break
            self._buckets.popitem(last=False)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)


class HTTPError(Exception):
    """An OpenAI-style error response raised by a body validator."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}


# A validator sees the parsed JSON body of a POST and raises HTTPError to reject it. It may
# return fields to add to the body (e.g. the default max_tokens); the guard splices them in.
BodyValidator = Callable[[str, Any], "dict[str, Any] | None"]
# Runs after validation, before the app (e.g. load the LoRA adapter the body names); may raise HTTPError.
BodyHook = Callable[[str, Any], Awaitable[None]]


def error_body(status: int, message: str, type_: str, request_id: str, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": status}, "request_id": request_id}
    ).encode()


# Words in a failed response that mean the engine replica (or its vLLM engine) died mid-request.
_REPLICA_GONE = ("EngineDeadError", "ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorDied", "DeploymentUnavailable",
                 "The actor died", "ray.exceptions")


class Routes:
    """The paths an app serves: exact ones, plus prefixes (``/v1/models/`` for ``/v1/models/{id}``)."""

    def __init__(self, exact: Iterable[str], prefixes: Iterable[str] = ()):
        self.exact = frozenset(exact) | OPEN_PATHS
        self.prefixes = tuple(prefixes)

    def __contains__(self, path: str) -> bool:
        return path in self.exact or (bool(self.prefixes) and path.startswith(self.prefixes))


def _non_finite(text: str):
    raise ValueError(f"{text} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _too_deep(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json_body(body: bytes) -> Any:
    """The parsed body, or HTTPError 400 for invalid JSON, NaN/Infinity, or nesting deeper than
    ``MAX_JSON_DEPTH``."""
    if not body:
        return None
    try:
        # UTF-8 only (json.loads would also take UTF-16/32, which with_fields cannot splice into).
        parsed = json.loads(body.decode("utf-8"), parse_constant=_non_finite, parse_float=_finite_float)
    except RecursionError:
        raise HTTPError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, non-finite numbers
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
    if isinstance(parsed, (dict, list)) and _too_deep(parsed, MAX_JSON_DEPTH):
        raise HTTPError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    return parsed


def with_fields(body: bytes, parsed: dict, fields: dict[str, Any]) -> bytes:
    """``body`` with ``fields`` added, without re-serialising it: spliced in after the opening
    brace (the fields are absent from ``parsed``; one present as null is replaced by re-dumping)."""
    if not fields:
        return body
    if parsed and not any(k in parsed for k in fields):
        brace = body.index(b"{")
        extra = json.dumps(fields)[1:-1].encode()
        return body[:brace + 1] + extra + b"," + body[brace + 1:]
    return json.dumps({**parsed, **fields}).encode()


def _client_of(scope, headers: dict[bytes, bytes], hops: int) -> str:
    """The client address: with ``hops`` proxies in front that append to X-Forwarded-For, the
    entry that many from the right (what the outermost trusted proxy saw); else the TCP peer."""
    if hops:
        forwarded = headers.get(b"x-forwarded-for")
        if forwarded:
            entries = [e.strip() for e in forwarded.decode("latin-1").split(",") if e.strip()]
            if len(entries) >= hops:  # fewer: the request skipped a proxy, so its header is the client's own
                return entries[-hops]
    client = scope.get("client") or ("anonymous", 0)
    return str(client[0])


def _route_path(scope) -> str:
    """The path inside the app (Serve's route prefix is the ASGI root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


_NO_LIMITER = object()


class GuardMiddleware:
    """ASGI middleware: auth (with a failed-login limit per client) -> route allow-list -> rate
    limit -> body validation -> ``prepare`` -> app; every response gets ``x-request-id``; a 5xx
    body is replaced by a clean message (503 when the engine died). WebSocket scopes pass the
    same checks (a refusal closes with 1008); only ``lifespan`` passes through.

    ``routes``: the paths served (``None``: all); others get 404 before any work.
    ``trusted_proxy_hops``: proxies in front that append the client to X-Forwarded-For (the
    rate limiters' client identity; 0 = the TCP peer).
    """

    def __init__(
        self,
        app,
        *,
        keys: KeySource | set[str] | None,
        limiter: RateLimiter | None = None,
        validate_body: BodyValidator | None = None,
        prepare: BodyHook | None = None,
        unavailable: Callable[[], bool] | None = None,
        routes: Routes | None = None,
        auth_limiter: RateLimiter | None | object = _NO_LIMITER,
        trusted_proxy_hops: int = 0,
    ):
        self.app = app
        self.keys = keys
        self._keys = keys if isinstance(keys, KeySource) or keys is None else StaticKeys(keys)
        self.limiter = limiter
        self.validate_body = validate_body
        self.prepare = prepare
        # True once the backend cannot serve (e.g. its engine died): 503 at once, and any 5xx
        # becomes a 503 "retry" rather than a 500.
        self.unavailable = unavailable
        self.routes = routes
        if auth_limiter is _NO_LIMITER:
            auth_limiter = RateLimiter(AUTH_FAILURES_PER_MINUTE, AUTH_FAILURE_BURST) if keys is not None else None
        self.auth_limiter = auth_limiter
        self.hops = trusted_proxy_hops

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            return await self.app(scope, receive, send)
        if kind not in ("http", "websocket"):
            return  # an ASGI extension this guard does not know is not served
        raw_headers = scope.get("headers", [])
        headers = {k.lower(): v for k, v in raw_headers}
        sent_id = headers.get(REQUEST_ID_HEADER)
        sent_id = sent_id.decode("latin-1") if sent_id is not None else None
        if sent_id is not None and REQUEST_ID_RE.fullmatch(sent_id):
            # Serve's Python proxy stamps x-request-id on the request and echoes it on the
            # response; add it only where nobody upstream did, so a response never carries it twice.
            request_id, stamp = sent_id, False
        else:
            # 32 random hex digits, like uuid4().hex at a quarter of the cost (this runs per request).
            request_id, stamp = os.urandom(16).hex(), True
            scope = dict(scope, headers=[*[(k, v) for k, v in raw_headers if k.lower() != REQUEST_ID_HEADER],
                                         (REQUEST_ID_HEADER, request_id.encode())])
        err = await self._check(scope, headers)
        if kind == "websocket":
            if err is not None:
                # Before accept, a close is an HTTP 403 to the client; 1008 = policy violation.
                return await send({"type": "websocket.close", "code": 1013 if err.status == 429 else 1008,
                                   "reason": err.message[:120]})
            return await self.app(scope, receive, send)

        async def reject(err: HTTPError):
            extra = [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
            await _send_json(send, err.status, error_body(err.status, err.message, err.type, request_id, err.param),
                             request_id if stamp else None, extra)

        if err is not None:
            return await reject(err)
        path = _route_path(scope)
        if scope.get("method") == "POST" and self.validate_body is not None:
            body = await read_body(receive)
            if body is None:
                return await reject(HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes"))
            try:
                parsed = parse_json_body(body)
                fields = self.validate_body(path, parsed)
                if fields:
                    body = with_fields(body, parsed, fields)
                    parsed.update(fields)
                if self.prepare is not None:
                    await self.prepare(path, parsed)
            except HTTPError as e:
                return await reject(e)
            except Exception as e:  # a clean 500, the cause goes to the replica log
                log.exception("request %s: preparing the request failed", request_id)
                return await reject(HTTPError(500, f"internal server error (request id {request_id}): "
                                                   f"{type(e).__name__}", "internal_error"))
            receive = replay_body(body, receive)
            if fields:
                scope = _with_content_length(scope, len(body))

        await self._call_app(scope, receive, send, request_id, stamp)

    async def _check(self, scope, headers: dict[bytes, bytes]) -> HTTPError | None:
        """Auth, routes, rate limit, backend health: the refusal, or None to go on."""
        path = _route_path(scope)
        if path in OPEN_PATHS:
            return None
        key = None
        if self._keys is not None:
            client = _client_of(scope, headers, self.hops)
            if self.auth_limiter is not None:
                wait = self.auth_limiter.blocked(client)
                if wait > 0:  # refused before the key is looked at: a guesser learns nothing
                    retry = max(1, math.ceil(wait))
                    return HTTPError(429, f"too many failed authentications from this client; retry after {retry} s",
                                     "rate_limit_error", headers={"Retry-After": str(retry)})
            scheme, _, key = (headers.get(b"authorization") or b"").decode("latin-1").partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key or not self._keys.accepts(key):
                if self.auth_limiter is not None:
                    self.auth_limiter.acquire(client)
                return HTTPError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                 "authentication_error", headers={"WWW-Authenticate": "Bearer"})
        if self.routes is not None and path not in self.routes:
            return HTTPError(404, f"route {path[:200]} is not served by this endpoint", "not_found_error")
        if self.limiter is not None:
            wait = self.limiter.acquire(key or _client_of(scope, headers, self.hops))
            if not isinstance(wait, float):  # a shared limiter (runtime.serving.ratelimit) awaits its store
                wait = await wait
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return HTTPError(429, f"rate limit exceeded for this API key; retry after {retry} s",
                                 "rate_limit_error", headers={"Retry-After": str(retry)})
        if self.unavailable is not None and self.unavailable():
            return _replica_failed()
        return None

    async def _call_app(self, scope, receive, send, request_id: str, stamp: bool = True):
        state = {"started": False, "status": 200, "held": None, "chunks": [], "stamp": stamp}

        async def guarded_send(message):
            if state["started"]:  # a chunk of a response under way (nothing held): the hot path
                return await send(message)
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


async def read_body(receive, limit: int | None = MAX_BODY_BYTES) -> bytes | None:
    """The whole request body from an ASGI ``receive``; None once it passes ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def replay_body(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
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


def _with_content_length(scope, length: int):
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return dict(scope, headers=[*headers, (b"content-length", str(length).encode())])
