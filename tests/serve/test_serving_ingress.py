"""Unit tests: the ingress guard (keys, rate limit, validation, request ids, clean 5xx) on a
plain Starlette app, and the spec/config rules. No Ray."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from runtime.errors import SpecError
from runtime.serving.guard import (
    AuthNotConfigured,
    GuardMiddleware,
    KeySource,
    RateLimiter,
    load_api_keys,
)
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

    spec = {"name": "chat", "model_id": "tiny", "adapters": {"support": "/x"}, "max_model_len": 512, **over}
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
