"""The agent's HTTP ingress on Ray Serve (built by ``serve_apps/agent.py``).

    POST   /sessions                    {"allow_tools": [...] optional} -> {"id": ..., "status": ...}
    POST   /sessions/{id}/messages      {"content": ..., "stream": false}
                                        -> the reply record, or NDJSON step records then the reply
    POST   /sessions/{id}/approvals     {"call_id": ..., "decision": "approve"|"reject", "arguments": {...},
                                         "reason": "..."} -> the reply record of the resumed turn
    GET    /sessions/{id}               -> messages, steps (one record per step), usage, errors,
                                           pending_approval (status awaiting_approval)
    DELETE /sessions/{id}               -> {"id": ..., "deleted": true} (frees one of the key's quota)
    GET    /stats                       -> tool success rate, steps, budget breaches (this replica's actors)
    POST   /v1/responses                OpenAI's Responses API: one session turn (runtime.agents.responses)
    GET    /v1/responses/{id}           -> that turn as a Response, rebuilt from the session

The guard is the LLM ingress's own middleware (``runtime.serving.guard``): the same
``RAYLANE_API_KEYS`` keys, the spec's per-key ``rate_limit``, the body-size cap, request ids and
OpenAI-style error bodies; ``request_validator`` below adds the agent's body checks
(``max_message_chars``). A session belongs to the key that created it (other keys get 404), its
id is made by the server, and a key holds at most ``max_sessions_per_key`` sessions. The ingress
is stateless; the session's actor is found by session id, so any replica (or a restarted one)
serves any session.
"""


import asyncio
import json
import logging
import re
from typing import Any

from runtime.agents.loop import ApprovalError
from runtime.agents.responses import ResponsesAPI, check_allow_tools, check_body
from runtime.agents.store import SessionConflict, check_shared
from runtime.agents.worker import (
    SESSION_ID_RE,
    SessionBusy,
    SessionNotFound,
    SessionQuotaExceeded,
    SessionRouter,
    owner_digest,
)
from runtime.serving.guard import GuardMiddleware, HTTPError, Routes, error_body
from runtime.serving.keys import KeySource, load_api_keys, replica_key_env
from runtime.serving.ratelimit import limiter_for

INGRESS_CPUS = 0.1


def build_ingress(spec, app_config: dict[str, Any], *, forward_keys: bool = False):
    """The Serve ``Application`` for an ``AgentSpec`` and its resolved ``app_config``.

    ``forward_keys``: tell the replicas where this process's keys are (``raylane run``, where the
    user exported them here): a keys-file path only, never a key value (``replica_key_env``).
    Deployed from a Serve config (KubeRay), replicas read them from their own environment.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from starlette.exceptions import HTTPException as StarletteHTTPException

    auth = spec.auth
    if auth == "api-key":
        load_api_keys()  # refuse to build an open endpoint when keys are missing

    rl = spec.rate_limit
    tool_names = [t.name for t in app_config["tools"]] + [n for s in spec.mcp_servers for n in s.tool_names()]
    validator = request_validator(spec.max_message_chars, tool_names, model=spec.name)
    quota = app_config.get("max_sessions_per_key")

    def _agent_limiter():
        limiter = limiter_for(rl, f"agent-{spec.name}")
        if hasattr(limiter, "start"):  # reach the shared store now, not on the first request's budget
            try:
                asyncio.get_running_loop().create_task(limiter.start())
            except RuntimeError:  # built outside an event loop: the first lease reaches it
                pass
        return limiter

    class _Guard(GuardMiddleware):
        # Built inside the replica: keys come from the replica's environment (a mounted secret).
        # A validator also switches on the guard's body-size cap (413).
        def __init__(self, app):
            super().__init__(app, keys=KeySource() if auth == "api-key" else None,
                             limiter=_agent_limiter(),
                             validate_body=validator, routes=ROUTES)

    env_vars = {}
    if forward_keys and auth == "api-key":
        env_vars = replica_key_env()

    api = FastAPI(title=f"raylane agent {spec.name}", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(_Guard)

    @api.exception_handler(StarletteHTTPException)  # ours and Starlette's own 404/405
    async def _http_error(request, exc):
        # The same error body as the guard's own rejections.
        kind = {404: "not_found_error", 409: "session_ended", 429: "session_quota_exceeded"}.get(
            exc.status_code, "invalid_request_error")
        return JSONResponse(status_code=exc.status_code, content=json.loads(error_body(
            exc.status_code, str(exc.detail), kind, request.headers.get("x-request-id", ""))))

    @api.exception_handler(HTTPError)  # raised by the /v1/responses routes
    async def _guard_error(request, exc):
        return JSONResponse(status_code=exc.status, headers=exc.headers, content=json.loads(error_body(
            exc.status, exc.message, exc.type, request.headers.get("x-request-id", ""), exc.param)))

    def _owner(request) -> str | None:
        # The guard has already checked the key; the session belongs to its digest.
        if auth != "api-key":
            return None
        return owner_digest(request.headers.get("authorization", "").partition(" ")[2].strip())

    def _sid(session_id: str) -> str:
        if not SESSION_ID_RE.fullmatch(session_id):
            raise HTTPException(400, "session id must be 1 to 64 letters, digits, '_' or '-' "
                                     "(use the id POST /sessions returned)")
        return session_id

    def _missing(session_id: str) -> HTTPException:
        return HTTPException(404, f"no session {session_id!r}; create one with POST /sessions")

    @api.exception_handler(Exception)
    async def _unexpected(request, exc):
        # The replica log keeps the traceback; the client gets a clean 500 from the guard.
        logging.getLogger("ray.serve").exception("agent ingress: %s %s failed", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"error": {"message": f"{type(exc).__name__}", "code": 500}})

    @serve.deployment(name="AgentIngress",
                      ray_actor_options={"num_cpus": INGRESS_CPUS, "runtime_env": {"env_vars": env_vars}},
                      max_ongoing_requests=1000,
                      autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 200})
    @serve.ingress(api)
    class AgentIngress:
        def __init__(self, app_config: dict):
            if auth == "api-key":
                load_api_keys()
            check_shared(**app_config["store"])  # SQLite on a multi-node cluster: one file for every node
            self.router = SessionRouter(app_config)
            self.openai = ResponsesAPI(self.router, model=spec.name, tool_choice=spec.llm.tool_choice, quota=quota)

        @api.get("/health")
        async def health(self) -> dict:
            return {"ok": True}

        @api.post("/sessions")
        async def create(self, request: Request) -> dict:
            body = await _json(request) or {}  # checked by request_validator in the guard
            try:
                return await self.router.create(_owner(request), body.get("allow_tools"))
            except SessionQuotaExceeded:
                raise HTTPException(429, f"this API key already holds {quota} sessions (max_sessions_per_key); "
                                         "delete one with DELETE /sessions/ID, or use another key") from None

        @api.get("/sessions/{session_id}")
        async def get(self, session_id: str, request: Request) -> dict:
            try:
                return await self.router.get(_sid(session_id), _owner(request))
            except SessionNotFound:
                raise _missing(session_id) from None

        @api.delete("/sessions/{session_id}")
        async def delete(self, session_id: str, request: Request) -> dict:
            try:
                return await self.router.delete(_sid(session_id), _owner(request))
            except SessionNotFound:
                raise _missing(session_id) from None

        @api.post("/sessions/{session_id}/messages")
        async def message(self, session_id: str, request: Request):
            _sid(session_id)
            owner = _owner(request)
            body = await _json(request)  # checked by request_validator in the guard
            content = body["content"]
            try:
                if body.get("stream"):
                    session = await self.router.get(session_id, owner)
                    if session["status"] == "awaiting_approval":
                        return _paused(session)
                    if session["status"] != "active":
                        return _ended(session)
                    # The first record before the headers: a busy session is a 409, not a broken stream.
                    events = self.router.send_stream(session_id, content, owner)
                    first = await anext(events)
                    return StreamingResponse(_ndjson(_prepend(first, events)), media_type="application/x-ndjson")
                reply = await self.router.send(session_id, content, owner)
            except SessionNotFound:
                raise _missing(session_id) from None
            except SessionConflict as e:
                return _conflict(e, request)
            if reply.get("reply") is None and reply["status"] == "awaiting_approval" and not reply["steps"]:
                return _paused(reply)
            if reply.get("reply") is None and reply["status"] != "active" and not reply["steps"]:
                return _ended(reply)
            return reply

        @api.post("/sessions/{session_id}/approvals")
        async def approve(self, session_id: str, request: Request):
            _sid(session_id)
            body = await _json(request)  # checked by request_validator in the guard
            try:
                return await self.router.decide(session_id, body["call_id"], body["decision"], body.get("arguments"),
                                                body.get("reason"), _owner(request))
            except SessionNotFound:
                raise _missing(session_id) from None
            except SessionConflict as e:
                return _conflict(e, request)
            except ApprovalError as e:
                e = getattr(e, "cause", e)  # Ray's wrapper keeps the worker's error as its cause
                kind = "approval_conflict" if e.status == 409 else "invalid_request_error"
                return JSONResponse(status_code=e.status, content=json.loads(error_body(
                    e.status, e.message, kind, request.headers.get("x-request-id", ""), e.param)))

        @api.get("/stats")
        async def stats(self) -> dict:
            return await self.router.stats()

        @api.post("/v1/responses")
        async def responses_create(self, request: Request):
            return await self.openai.create(request, _owner(request))

        @api.get("/v1/responses/{response_id}")
        async def responses_get(self, response_id: str, request: Request) -> dict:
            return await self.openai.retrieve(response_id, _owner(request))

    return AgentIngress.bind(app_config)


_SESSIONS = re.compile(r"(?:^|/)sessions/?$")
_MESSAGES = re.compile(r"(?:^|/)sessions/[^/]*/messages/?$")
_RESPONSES = re.compile(r"(?:^|/)v1/responses/?$")
# The guard's route allow-list: anything else is a 404 before any work.
ROUTES = Routes(["/sessions", "/stats", "/v1/responses"], ["/sessions/", "/v1/responses/"])
_APPROVALS = re.compile(r"(?:^|/)sessions/[^/]*/approvals/?$")
MAX_REASON_CHARS = 2000


def request_validator(max_message_chars: int, tool_names: list[str], model: str | None = None):
    """The guard's body check for the agent routes (it runs before the body reaches the app,
    after auth, the rate limit and the size cap).

    >>> check = request_validator(100, ["calculator"])
    >>> check("/sessions/abc/messages", {"content": "2+2?"})
    """
    def validate(path: str, body: Any) -> None:
        if model is not None and _RESPONSES.search(path):
            check_body(body, model=model, max_message_chars=max_message_chars, tool_names=tool_names)
        elif _SESSIONS.search(path):
            body = {} if body is None else body
            if not isinstance(body, dict):
                raise HTTPError(400, 'body must be a JSON object, e.g. {} or {"allow_tools": ["NAME"]}')
            if "id" in body:
                raise HTTPError(400, 'session ids are made by the server: omit "id" and use the "id" of the reply',
                                param="id")
            unknown = sorted(set(body) - {"allow_tools"})
            if unknown:
                raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}; a new session accepts allow_tools",
                                param=unknown[0])
            check_allow_tools(body.get("allow_tools", []), tool_names)
        elif _MESSAGES.search(path):
            content = body.get("content") if isinstance(body, dict) else None
            if not isinstance(content, str) or not content.strip():
                raise HTTPError(400, 'body must be {"content": "<text>"} with non-empty text', param="content")
            if len(content) > max_message_chars:
                raise HTTPError(400, f"content has {len(content)} characters, over this agent's limit of "
                                     f"{max_message_chars} (max_message_chars)", param="content")
            unknown = sorted(set(body) - {"content", "stream"})
            if unknown:
                raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}; a message accepts content and stream",
                                param=unknown[0])
            if not isinstance(body.get("stream", False), bool):
                raise HTTPError(400, "stream must be true or false", param="stream")
        elif _APPROVALS.search(path):
            check_approval(body)

    return validate


def check_approval(body: Any) -> None:
    """The body of ``POST /sessions/ID/approvals`` (the tool's schema is checked by the session actor).

    >>> check_approval({"call_id": "c1", "decision": "reject", "reason": "not today"})
    """
    example = 'e.g. {"call_id": "<pending_approval.call_id>", "decision": "approve"}'
    if not isinstance(body, dict):
        raise HTTPError(400, f"body must be a JSON object, {example}")
    unknown = sorted(set(body) - {"call_id", "decision", "arguments", "reason"})
    if unknown:
        raise HTTPError(400, f"unknown field(s) {', '.join(unknown)}; an approval accepts call_id, decision, "
                             "arguments and reason", param=unknown[0])
    if not isinstance(body.get("call_id"), str) or not body["call_id"]:
        raise HTTPError(400, f"call_id must be the pending call's id from GET /sessions/ID ({example})",
                        param="call_id")
    if body.get("decision") not in ("approve", "reject"):
        raise HTTPError(400, f'decision must be "approve" or "reject" (got {body.get("decision")!r})', param="decision")
    if "arguments" in body and not isinstance(body["arguments"], dict):
        raise HTTPError(400, "arguments must be a JSON object (the edited arguments of the call)", param="arguments")
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise HTTPError(400, f"reason must be a string of at most {MAX_REASON_CHARS} characters", param="reason")


async def _json(request) -> Any:
    from fastapi import HTTPException

    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise HTTPException(400, "request body is not valid JSON") from None



def _paused(record: dict):
    from fastapi.responses import JSONResponse

    pending = record.get("pending_approval") or {}
    sid = record.get("session_id") or record.get("id")
    return JSONResponse(status_code=409, content={
        "error": {"message": f"session {sid} is awaiting approval of call {pending.get('call_id')} "
                             f"({pending.get('tool')}); decide first with POST /sessions/{sid}/approvals "
                             '{"call_id": ..., "decision": "approve" or "reject"}',
                  "type": "awaiting_approval", "param": "call_id", "code": 409},
        "pending_approval": pending})


def _ended(record: dict):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=409, content={
        "error": {"message": f"session {record.get('session_id') or record.get('id')} has ended "
                             f"({record.get('end_reason')}); start a new one with POST /sessions",
                  "type": "session_ended", "code": 409},
        "end_reason": record.get("end_reason")})



def _conflict(e: Exception, request):
    """409 for a session another turn holds (``session_busy``) or saved first (``session_conflict``)."""
    from fastapi.responses import JSONResponse

    cause = getattr(e, "cause", None) or e  # Ray's wrapper keeps the worker's error as its cause
    kind = "session_busy" if isinstance(e, SessionBusy) or isinstance(cause, SessionBusy) else "session_conflict"
    return JSONResponse(status_code=409, content=json.loads(error_body(
        409, getattr(cause, "message", str(cause)), kind, request.headers.get("x-request-id", ""))))


async def _prepend(first, rest):
    yield first
    async for event in rest:
        yield event


async def _ndjson(events):
    async for event in events:
        yield json.dumps(event, default=str) + "\n"
