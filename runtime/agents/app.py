"""The agent's HTTP ingress on Ray Serve (built by ``serve_apps/agent.py``).

    POST /sessions                      {"id": optional}       -> {"id": ..., "status": ...}
    POST /sessions/{id}/messages        {"content": ..., "stream": false}
                                        -> the reply record, or NDJSON step records then the reply
    GET  /sessions/{id}                 -> messages, steps (one record per step), usage, errors
    GET  /stats                         -> tool success rate, steps, budget breaches (this replica's actors)

Auth and rate limiting are the LLM ingress's own middleware (``runtime.serving.guard``): the same
``RAYLANE_API_KEYS`` keys work on both. The ingress is stateless; the session's actor is found by
session id, so any replica (or a restarted one) serves any session.
"""


import json
import logging
from typing import Any

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

    from runtime.agents.worker import SessionNotFound, SessionRouter
    from runtime.serving.guard import (
        GuardMiddleware,
        KeySource,
        load_api_keys,
        replica_key_env,
    )

    auth = spec.auth
    if auth == "api-key":
        load_api_keys()  # refuse to build an open endpoint when keys are missing

    class _Guard(GuardMiddleware):
        # Built inside the replica: keys come from the replica's environment (a mounted secret).
        def __init__(self, app):
            super().__init__(app, keys=KeySource() if auth == "api-key" else None)

    env_vars = {}
    if forward_keys and auth == "api-key":
        env_vars = replica_key_env()

    api = FastAPI(title=f"raylane agent {spec.name}", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(_Guard)

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
            self.router = SessionRouter(app_config)

        @api.get("/health")
        async def health(self) -> dict:
            return {"ok": True}

        @api.post("/sessions")
        async def create(self, request: Request) -> dict:
            body = await _json(request)
            sid = body.get("id") if isinstance(body, dict) else None
            if sid is not None and (not isinstance(sid, str) or not sid or len(sid) > 128):
                raise HTTPException(400, "id must be a non-empty string of at most 128 characters")
            return await self.router.create(sid)

        @api.get("/sessions/{session_id}")
        async def get(self, session_id: str) -> dict:
            try:
                return await self.router.get(session_id)
            except SessionNotFound:
                raise HTTPException(404, f"no session {session_id!r}; create one with POST /sessions") from None

        @api.post("/sessions/{session_id}/messages")
        async def message(self, session_id: str, request: Request):
            body = await _json(request)
            content = body.get("content") if isinstance(body, dict) else None
            if not isinstance(content, str) or not content.strip():
                raise HTTPException(400, 'body must be {"content": "<text>"} with non-empty text')
            try:
                if body.get("stream"):
                    session = await self.router.get(session_id)
                    if session["status"] != "active":
                        return _ended(session)
                    return StreamingResponse(_ndjson(self.router.send_stream(session_id, content)),
                                             media_type="application/x-ndjson")
                reply = await self.router.send(session_id, content)
            except SessionNotFound:
                raise HTTPException(404, f"no session {session_id!r}; create one with POST /sessions") from None
            if reply.get("reply") is None and reply["status"] != "active" and not reply["steps"]:
                return _ended(reply)
            return reply

        @api.get("/stats")
        async def stats(self) -> dict:
            return await self.router.stats()

    return AgentIngress.bind(app_config)


async def _json(request) -> Any:
    from fastapi import HTTPException

    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise HTTPException(400, "request body is not valid JSON") from None



def _ended(record: dict):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=409, content={
        "error": {"message": f"session {record.get('session_id') or record.get('id')} has ended "
                             f"({record.get('end_reason')}); start a new one with POST /sessions",
                  "type": "session_ended", "code": 409},
        "end_reason": record.get("end_reason")})



async def _ndjson(events):
    async for event in events:
        yield json.dumps(event, default=str) + "\n"
