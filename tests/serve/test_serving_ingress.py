"""Unit tests: the ingress guard (keys, rate limit, validation, request ids, clean 5xx) on a
plain Starlette app, and the spec/config rules. No Ray."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from runtime.errors import AuthNotConfigured, SpecError
from runtime.serving.guard import GuardMiddleware, RateLimiter
from runtime.serving.keys import KeySource, load_api_keys
from runtime.specs import parse_spec


async def echo(request):
    return JSONResponse({"got": await request.json()})


async def boom(request):
    raise RuntimeError("secret internal detail\nTraceback (most recent call last): ...")


async def died(request):
    return PlainTextResponse("ray.exceptions.ActorDiedError: The actor died unexpectedly", status_code=500)


async def engine_dead(request):
    return PlainTextResponse("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue",
                             status_code=500)


def client(**guard) -> httpx.AsyncClient:
    inner = Starlette(routes=[Route("/v1/echo", echo, methods=["POST"]), Route("/v1/boom", boom, methods=["POST"]),
                              Route("/v1/died", died, methods=["POST"]),
                              Route("/v1/engine-dead", engine_dead, methods=["POST"])])
    app = GuardMiddleware(inner, **guard)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


def spec_validator(**over):
    from runtime.serving.validation import request_validator

    spec = parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "model_id": "tiny",
                       "adapters": {"support": "/x"}, "max_model_len": 512, "auth": "none", **over})
    return request_validator(spec)


@pytest.mark.anyio
async def test_api_keys_and_request_ids():
    async with client(keys={"k1"}) as c:
        r = await c.post("/v1/echo", json={"a": 1})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error" and r.headers["x-request-id"]
        r = await c.post("/v1/echo", json={"a": 1}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.post("/v1/echo", json={"a": 1}, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json() == {"got": {"a": 1}} and len(r.headers.get_list("x-request-id")) == 1
        # Behind Serve's proxy the request already has an id and the proxy echoes it: not added twice.
        r = await c.post("/v1/echo", json={"a": 1}, headers={"Authorization": "Bearer k1", "x-request-id": "abc"})
        assert r.status_code == 200 and "x-request-id" not in r.headers


@pytest.mark.anyio
async def test_rate_limit_is_per_key_with_retry_after():
    now = [0.0]
    limiter = RateLimiter(requests_per_minute=60, burst=2, clock=lambda: now[0])
    async with client(keys={"a", "b"}, limiter=limiter) as c:
        ha, hb = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
        codes = [(await c.post("/v1/echo", json={}, headers=ha)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = await c.post("/v1/echo", json={}, headers=ha)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "rate limit" in r.json()["error"]["message"]
        assert (await c.post("/v1/echo", json={}, headers=hb)).status_code == 200  # other key unaffected
        now[0] += 1.0  # one token refilled at 1 request/s
        assert (await c.post("/v1/echo", json={}, headers=ha)).status_code == 200


@pytest.mark.anyio
async def test_body_validation():
    async with client(keys=None, validate_body=spec_validator()) as c:
        r = await c.post("/v1/echo", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await c.post("/v1/echo", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and "'other' does not exist" in r.json()["error"]["message"]
        r = await c.post("/v1/echo", json={"model": "tiny:nope", "prompt": "x"})
        assert r.status_code == 404
        r = await c.post("/v1/echo", json={"model": "tiny", "prompt": "x", "max_tokens": 513})
        assert r.status_code == 400 and "limit of 512 tokens (max_model_len)" in r.json()["error"]["message"]
        r = await c.post("/v1/echo", json={"model": "tiny", "prompt": "x", "max_tokens": "ten"})
        assert r.status_code == 400
        for ok in ({"model": "tiny", "max_tokens": 512}, {"model": "tiny:support"}, {"prompt": "no model"}):
            assert (await c.post("/v1/echo", json=ok)).status_code == 200


@pytest.mark.anyio
async def test_5xx_never_leaks_a_traceback_and_dead_replica_is_503():
    async with client(keys=None) as c:
        r = await c.post("/v1/boom", json={})
        assert r.status_code == 500
        assert "Traceback" not in r.text and "secret" not in r.text and r.headers["x-request-id"] in r.text
        for path in ("/v1/died", "/v1/engine-dead"):
            r = await c.post(path, json={})
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "Error" not in r.text


@pytest.mark.anyio
async def test_unavailable_backend_gets_503_before_and_after_the_app():
    dead = {"now": False}
    async with client(keys=None, validate_body=lambda path, body: None, unavailable=lambda: dead["now"]) as c:
        assert (await c.post("/v1/echo", json={"a": 1})).status_code == 200
        dead["now"] = True
        r = await c.post("/v1/echo", json={"a": 1})  # refused up front: the app is not called
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "service_unavailable"
        r = await c.post("/v1/boom", json={})  # a plain 500 from a dead backend is a 503 too
        assert r.status_code == 503 and "secret" not in r.text


@pytest.mark.anyio
async def test_prepare_hook_runs_after_validation_and_its_errors_are_clean():
    from runtime.serving.guard import HTTPError

    seen = []

    async def prepare(path, body):
        seen.append(body["model"])
        if body["model"] == "tiny:gone":
            raise HTTPError(404, "model 'tiny:gone' does not exist", "not_found_error", "model")
        if body["model"] == "tiny:broken":
            raise OSError("disk detail /secret/path")

    async with client(keys=None, validate_body=lambda path, body: None, prepare=prepare) as c:
        assert (await c.post("/v1/echo", json={"model": "tiny:support"})).json() == {"got": {"model": "tiny:support"}}
        assert (await c.post("/v1/echo", json={"model": "tiny:gone"})).status_code == 404
        r = await c.post("/v1/echo", json={"model": "tiny:broken"})
        assert r.status_code == 500 and "/secret/path" not in r.text and r.headers["x-request-id"] in r.text
    assert seen == ["tiny:support", "tiny:gone", "tiny:broken"]


def test_key_sources(tmp_path):
    assert load_api_keys({"RAYLANE_API_KEYS": " a, b ,,"}) == {"a", "b"}
    f = tmp_path / "keys"
    f.write_text("# rotated 2026-11\nk1\nk2,k3\n")
    assert load_api_keys({"RAYLANE_API_KEYS_FILE": str(f)}) == {"k1", "k2", "k3"}
    with pytest.raises(AuthNotConfigured, match="auth: none"):
        load_api_keys({})
    with pytest.raises(AuthNotConfigured, match="cannot be read"):
        load_api_keys({"RAYLANE_API_KEYS_FILE": str(tmp_path / "missing")})
    src = KeySource({"RAYLANE_API_KEYS_FILE": str(f)}, check_every_s=0)
    import os
    f.write_text("new-key\n")
    os.utime(f, (1, 1))
    assert src.keys() == {"new-key"}  # secret rotation is picked up without a restart


def test_spec_rules():
    base = {"kind": "OnlineInference", "name": "chat", "model": "tiny"}
    with pytest.raises(SpecError) as e:
        parse_spec({**base, "engine_kwargs": {"max_model_len": 4}, "max_tokens_limit": 4096})
    text = str(e.value)
    assert "use 'max_model_len'" in text and "max_tokens_limit (4096) must be below max_model_len" in text
    with pytest.raises(SpecError, match=r"min_replicas \(3\) exceeds max_replicas \(1\)"):
        parse_spec({**base, "autoscaling": {"min_replicas": 3}})
    with pytest.raises(SpecError, match="did you mean 'max_replicas'"):
        parse_spec({**base, "autoscaling": {"max_replica": 2}})
    with pytest.raises(SpecError, match="adapter names"):
        parse_spec({**base, "adapters": {"a:b": "/x"}})


def test_serve_config_validates_with_ray_schema():
    from ray.serve.schema import ServeDeploySchema

    from runtime.serving import build_serve_config
    from runtime.specs import load_spec
    from tests.conftest import EXAMPLES

    spec = load_spec(EXAMPLES / "serve.yaml")
    config = build_serve_config(spec)
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "serve_apps.serve:build_serve_app"
    assert parse_spec(app["args"]["spec"]) == spec  # the embedded spec round-trips exactly


def test_engine_and_placement_from_spec():
    from runtime.serving.config import llm_config

    spec = parse_spec({"kind": "OnlineInference", "name": "big", "model": "tiny", "tensor_parallel_size": 2,
                       "resources": {"gpus_per_worker": 1, "cpus_per_worker": 4, "accelerator_type": "L4"},
                       "adapters": {"support": "/a"}, "engine_kwargs": {"kv_cache_dtype": "fp8"}})
    cfg = llm_config(spec, "/models/x")
    assert cfg["placement_group_config"] == {"bundles": [{"GPU": 1, "CPU": 4}] * 2, "strategy": "STRICT_PACK"}
    assert cfg["accelerator_type"] == "L4"
    ek = cfg["engine_kwargs"]
    assert ek["tensor_parallel_size"] == 2 and ek["enable_lora"] and ek["kv_cache_dtype"] == "fp8"
    assert cfg["lora_config"] == {"max_num_adapters_per_replica": 4}
    from ray.serve.llm import LLMConfig

    LLMConfig(**{k: v for k, v in cfg.items() if k != "accelerator_type"})  # Ray's own model accepts it


def test_tool_calling_spec_reaches_vllm_frontend_options():
    from runtime.serving.config import llm_config

    base = {"kind": "OnlineInference", "name": "chat", "model": "tiny"}
    ek = llm_config(parse_spec({**base, "tool_calling": {"parser": "hermes"}}), "/m")["engine_kwargs"]
    assert ek["enable_auto_tool_choice"] is True and ek["tool_call_parser"] == "hermes"
    assert "tool_call_parser" not in llm_config(parse_spec(base), "/m")["engine_kwargs"]
    with pytest.raises(SpecError, match="tool_call_parser \\(use 'tool_calling'\\)"):
        parse_spec({**base, "engine_kwargs": {"tool_call_parser": "hermes"}})
    with pytest.raises(SpecError, match="did you mean 'parser'"):
        parse_spec({**base, "tool_calling": {"parsr": "hermes"}})


def test_tools_without_tool_calling_name_the_spec_field():
    from runtime.serving.guard import HTTPError

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    off, on = spec_validator(), spec_validator(tool_calling={"parser": "hermes"})
    with pytest.raises(HTTPError) as e:
        off("/v1/chat/completions", {"model": "tiny", "tools": tools, "tool_choice": "required"})
    assert e.value.status == 400 and "tool_calling" in e.value.message and e.value.param == "tool_choice"
    with pytest.raises(HTTPError):
        off("/v1/chat/completions", {"model": "tiny", "tools": tools})  # no tool_choice means "auto"
    off("/v1/chat/completions", {"model": "tiny", "tools": tools, "tool_choice": "none"})
    on("/v1/chat/completions", {"model": "tiny", "tools": tools, "tool_choice": {"type": "function",
                                                                                "function": {"name": "f"}}})


# ---- hardening (issue 15): each test below failed on the guard before it ----

def serving_spec(**over):
    return parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "model_id": "tiny",
                       "adapters": {"support": "/x"}, "max_model_len": 512, "auth": "none", **over})


def routed_client(spec=None, transport_client=("10.0.0.9", 1234), **guard) -> httpx.AsyncClient:
    """The guard configured as the LLM replica configures it, over an app that echoes every path."""
    from runtime.serving.validation import request_validator, served_routes

    async def any_path(scope, receive, send):
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        length = dict(scope["headers"]).get(b"content-length", b"").decode()
        out = JSONResponse({"path": scope["path"], "body": body.decode(), "length": length})
        await out(scope, receive, send)

    spec = spec or serving_spec()
    guard.setdefault("validate_body", request_validator(spec))
    guard.setdefault("routes", served_routes(spec))
    guard.setdefault("keys", None)
    app = GuardMiddleware(any_path, **guard)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False,
                                                           client=transport_client), base_url="http://t")


@pytest.mark.anyio
async def test_websocket_scopes_are_authenticated_and_only_lifespan_passes():
    reached, sent = [], []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    app = GuardMiddleware(inner, keys={"k1"})
    ws = {"type": "websocket", "path": "/v1/realtime", "headers": []}
    await app(ws, receive, send)
    assert reached == [] and sent == [{"type": "websocket.close", "code": 1008, "reason": sent[0]["reason"]}]
    await app({**ws, "headers": [(b"authorization", b"Bearer wrong")]}, receive, send)
    assert reached == [] and sent[-1]["code"] == 1008
    await app({**ws, "headers": [(b"authorization", b"Bearer k1")]}, receive, send)
    await app({"type": "lifespan"}, receive, send)
    assert reached == ["websocket", "lifespan"]


@pytest.mark.anyio
async def test_open_paths_match_exactly():
    async with routed_client(keys={"k1"}, routes=None) as c:
        assert (await c.get("/health")).status_code == 200
        for path in ("/healthXYZ", "/health/../tokenize", "/-/healthz-admin"):
            assert (await c.get(path)).status_code == 401, path


@pytest.mark.anyio
async def test_only_served_routes_answer():
    auth = {"Authorization": "Bearer k1"}
    async with routed_client(keys={"k1"}) as c:
        for path in ("/tokenize", "/detokenize", "/pooling", "/score", "/rerank", "/invocations", "/docs",
                     "/openapi.json", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/sleep", "/wake_up",
                     "/collective_rpc", "/start_profile", "/reset_prefix_cache", "/v1/responses", "/v1/embeddings",
                     "/v1/chat/completions/x"):
            r = await c.post(path, json={"model": "tiny", "prompt": "x"}, headers=auth)
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
        assert (await c.get("/docs", headers=auth)).status_code == 404
        assert (await c.get("/v1/models/tiny", headers=auth)).status_code == 200
        for path in ("/v1/chat/completions", "/v1/completions"):
            assert (await c.post(path, json={"model": "tiny", "max_tokens": 4}, headers=auth)).status_code == 200
        assert (await c.post("/tokenize", json={})).status_code == 401  # no key: nothing about routes leaks
    async with routed_client(serving_spec(extra_routes=["/tokenize", "/v1/responses"])) as c:
        assert (await c.post("/tokenize", json={"model": "tiny", "prompt": "x"})).status_code == 200
        assert (await c.post("/score", json={"model": "tiny"})).status_code == 404


@pytest.mark.anyio
async def test_token_limits_cannot_be_dodged():
    spec = serving_spec(max_tokens_limit=16, extra_routes=["/v1/responses", "/invocations"])
    async with routed_client(spec) as c:
        # Omitted: the limit is filled in (spliced into the body, content-length fixed).
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        got = r.json()
        assert json.loads(got["body"]) == {"max_tokens": 16, "model": "tiny", "prompt": "x"}
        assert int(got["length"]) == len(got["body"].encode())
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [], "max_tokens": None})
        assert json.loads(r.json()["body"])["max_completion_tokens"] == 16
        r = await c.post("/v1/responses", json={"model": "tiny", "input": "x"})
        assert json.loads(r.json()["body"])["max_output_tokens"] == 16
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 8})
        assert json.loads(r.json()["body"])["max_tokens"] == 8  # a request's own smaller value stays
        # Every token field on every route, /invocations included.
        for path, body in (("/v1/responses", {"max_output_tokens": 17}), ("/invocations", {"max_tokens": 100}),
                           ("/v1/chat/completions", {"max_completion_tokens": 17})):
            r = await c.post(path, json={"model": "tiny", **body})
            assert r.status_code == 400 and "limit of 16 tokens (max_tokens_limit)" in r.text, path
        assert (await c.post("/invocations", json={"model": "nope"})).status_code == 404


@pytest.mark.anyio
async def test_fields_that_multiply_work_are_capped():
    async with routed_client() as c:
        bad = [{"n": 1000}, {"best_of": 17}, {"n": 0}, {"n": True}, {"prompt": ["x"] * 5000},
               {"prompt": list(range(513))}, {"stop": ["s"] * 100}, {"stop": "s" * 1000}, {"stop": [1]},
               {"stop_token_ids": list(range(100))}]
        for body in bad:
            r = await c.post("/v1/completions", json={"model": "tiny", "max_tokens": 4, **body})
            assert r.status_code == 400, body
            assert r.json()["error"]["param"] == next(iter(body)), body
        ok = {"model": "tiny", "max_tokens": 4, "n": 2, "prompt": ["a", "b"], "stop": ["\n", "END"]}
        assert (await c.post("/v1/completions", json=ok)).status_code == 200
        assert (await c.post("/v1/completions", json={**ok, "prompt": [1, 2, 3]})).status_code == 200


@pytest.mark.anyio
async def test_malformed_json_is_a_clean_400():
    async with routed_client() as c:
        for raw in (b'{"model": "tiny", "temperature": NaN}', b'{"model": "tiny", "temperature": Infinity}',
                    b'{"model": "tiny", "temperature": -Infinity}', b'{"model": "tiny", "top_p": 1e999}',
                    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70, b'{"model": "\xff"}'):
            r = await c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400, raw[:40]
            assert r.json()["error"]["type"] == "invalid_request_error" and "Traceback" not in r.text
        for model in (["tiny"], {"id": "tiny"}, 3):
            r = await c.post("/v1/completions", json={"model": model, "prompt": "x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", model
        nested_ok = {"model": "tiny", "max_tokens": 4, "x": [[[[{"a": [1]}]]]]}
        assert (await c.post("/v1/completions", json=nested_ok)).status_code == 200


@pytest.mark.anyio
async def test_failed_authentication_is_limited_per_client():
    now = [0.0]
    limiter = RateLimiter(requests_per_minute=60, burst=3, clock=lambda: now[0])
    async with routed_client(keys={"k1"}, auth_limiter=limiter, trusted_proxy_hops=1) as c:
        a = {"x-forwarded-for": "forged, 1.1.1.1"}
        codes = [(await c.get("/v1/models", headers={**a, "Authorization": f"Bearer g{i}"})).status_code
                 for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]
        # Locked out: even the right key gets 429, so a guesser cannot tell a hit from a miss.
        r = await c.get("/v1/models", headers={**a, "Authorization": "Bearer k1"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # Another client (the last X-Forwarded-For entry, appended by the one trusted proxy) is unaffected.
        b = {"x-forwarded-for": "1.1.1.1, 2.2.2.2", "Authorization": "Bearer k1"}
        assert (await c.get("/v1/models", headers=b)).status_code == 200
        now[0] += 1.0
        assert (await c.get("/v1/models", headers={**a, "Authorization": "Bearer k1"})).status_code == 200
    async with routed_client(keys={"k1"}) as c:  # on by default
        codes = {(await c.get("/v1/models", headers={"Authorization": f"Bearer g{i}"})).status_code
                 for i in range(40)}
        assert codes == {401, 429}


@pytest.mark.anyio
async def test_open_endpoint_limits_the_real_client():
    now = [0.0]

    def limiter():
        return RateLimiter(requests_per_minute=60, burst=1, clock=lambda: now[0])

    async with routed_client(limiter=limiter(), trusted_proxy_hops=1) as c:
        h1, h2 = {"x-forwarded-for": "1.1.1.1"}, {"x-forwarded-for": "2.2.2.2"}
        assert (await c.get("/v1/models", headers=h1)).status_code == 200
        assert (await c.get("/v1/models", headers=h1)).status_code == 429
        assert (await c.get("/v1/models", headers=h2)).status_code == 200  # not the proxy's shared bucket
    async with routed_client(limiter=limiter()) as c:  # no trusted proxy: a forged header buys nothing
        assert (await c.get("/v1/models", headers=h1)).status_code == 200
        assert (await c.get("/v1/models", headers=h2)).status_code == 429


def test_rate_limiter_state_is_bounded():
    now = [0.0]
    limiter = RateLimiter(requests_per_minute=60, burst=5, clock=lambda: now[0], max_buckets=100)
    for i in range(1000):
        limiter.acquire(f"client-{i}")
    assert len(limiter) == 100
    assert limiter.acquire("client-999") == 0.0 and limiter.acquire("client-999") == 0.0  # recent ones kept
    now[0] += 10.0  # every bucket has refilled: idle ones are dropped as traffic passes over them
    for i in range(60):
        limiter.acquire("busy")
        now[0] += 1.0
    assert len(limiter) <= 2


def test_key_rotation_fails_closed(tmp_path, caplog):
    import os

    f = tmp_path / "keys"
    f.write_text("k1\n")
    src = KeySource({"RAYLANE_API_KEYS_FILE": str(f)}, check_every_s=0)
    assert src.accepts("k1")
    f.write_text("# all revoked\n")
    assert src.keys() == set() and not src.accepts("k1")
    f.write_text("k2\n")
    os.utime(f, (5, 5))
    assert src.accepts("k2") and not src.accepts("k1")
    f.unlink()
    assert not src.accepts("k2") and "revoked" in caplog.text
    f.write_text("k3\n")  # the secret comes back
    assert src.accepts("k3")
    both = KeySource({"RAYLANE_API_KEYS_FILE": str(f), "RAYLANE_API_KEYS": "envkey"}, check_every_s=0)
    assert both.accepts("envkey") and both.accepts("k3")
    assert "both RAYLANE_API_KEYS and RAYLANE_API_KEYS_FILE are set" in caplog.text
    assert load_api_keys({"RAYLANE_API_KEYS": "a,#b"}) == {"a", "#b"}  # only whole lines are comments


@pytest.mark.anyio
async def test_client_request_ids_are_validated():
    async with routed_client(routes=None) as c:
        r = await c.get("/v1/models", headers={"x-request-id": "req-1.a_b"})
        assert "x-request-id" not in r.headers  # kept as sent (Serve's proxy echoes it)
        for bad in ("a b", "x" * 200, "<script>", "a\\u2028b", "\xff"):
            r = await c.get("/v1/models", headers={"x-request-id": bad.encode("latin-1")})
            assert r.status_code == 200 and len(r.headers.get_list("x-request-id")) == 1, bad
            rid = r.headers["x-request-id"]
            assert rid != bad and len(rid) == 32 and rid.isalnum(), bad
    async with routed_client(keys={"k1"}) as c:  # a non-UTF-8 key is just a wrong key
        r = await c.get("/v1/models", headers={"Authorization": b"Bearer \xff\xfe"})
        assert r.status_code == 401


def test_replica_key_env_never_carries_a_key_value(tmp_path, monkeypatch):
    import os
    import stat

    from runtime.serving.keys import replica_key_env

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    env = replica_key_env({"RAYLANE_API_KEYS": "sekrit-123,other-456"})
    assert list(env) == ["RAYLANE_API_KEYS_FILE"] and "sekrit" not in json.dumps(env)
    path = env["RAYLANE_API_KEYS_FILE"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert KeySource(env).accepts("sekrit-123")  # what the replica reads
    assert replica_key_env({"RAYLANE_API_KEYS": "sekrit-123,other-456"}) == env  # written once
    monkeypatch.chdir(tmp_path)
    assert replica_key_env({"RAYLANE_API_KEYS_FILE": "keys", "RAYLANE_API_KEYS": "x"}) == {
        "RAYLANE_API_KEYS_FILE": str(tmp_path / "keys")}
    assert replica_key_env({}) == {}


@pytest.mark.anyio
async def test_only_utf8_json_is_parsed():
    async with routed_client() as c:
        raw = json.dumps({"model": "tiny", "prompt": "x"}).encode("utf-16")
        r = await c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400
