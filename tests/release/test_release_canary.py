"""The serving side of a rollout: raylane's guard -> CanaryRouter -> a plain Starlette app (no Ray,
no engine): sticky weighted rewrites of the stable model id, the version header, per-arm counts."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from runtime.release.state import RolloutState, RolloutStore
from runtime.release.windows import ArmRecorder, read_windows
from runtime.serving.canary import CanaryRouter, RolloutWatch, candidate_ref
from runtime.serving.guard import GuardMiddleware
from runtime.serving.validation import request_validator
from runtime.specs import parse_spec

KEYS = [f"key-{i}" for i in range(300)]
MSG = [{"role": "user", "content": "hi"}]


async def chat(request):
    body = await request.json()  # like vLLM, the response echoes the model id it served
    return JSONResponse({"served": body["model"], "model": body["model"]},
                        status_code=500 if body.get("user") == "fail" else 200)


@pytest.fixture
def rig(tmp_path):
    spec = parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none",
                       "adapters": {"support": "models:/bot@champion"}})
    store = RolloutStore(str(tmp_path))
    state = RolloutState.start(name="chat", app="chat", model_id="chat:support", champion="models:/bot/1",
                               candidate="models:/bot/2", config={"steps": [50, 100]})
    store.save(state)
    ensured: list[str] = []

    async def ensure(model_id):
        ensured.append(model_id)

    recorder = ArmRecorder(str(tmp_path), "chat", replica="r0")
    inner = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    router = CanaryRouter(inner, watch=RolloutWatch(str(tmp_path), "chat", ttl_s=0), recorder=recorder,
                          ensure=ensure, flush_s=0)
    app = GuardMiddleware(router, keys=set(KEYS), validate_body=request_validator(spec))
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return c, store, state, ensured, recorder, tmp_path


async def ask(c, key, model="chat:support", **extra):
    return await c.post("/v1/chat/completions", json={"model": model, "messages": MSG, **extra},
                        headers={"Authorization": f"Bearer {key}"})


@pytest.mark.anyio
async def test_weighted_sticky_rewrite_with_version_header(rig):
    c, store, state, ensured, recorder, root = rig
    async with c:
        arms = {}
        for key in KEYS:
            r = await ask(c, key)
            assert r.status_code == 200
            arm = r.headers["x-raylane-arm"]
            arms[key] = arm
            want = {"champion": ("chat:support", "models:/bot/1"), "candidate": ("chat:support@2", "models:/bot/2")}
            assert (r.json()["served"], r.headers["x-raylane-model-version"]) == want[arm]
            assert r.json()["model"] == "chat:support"  # the client reads back the id it sent
        share = list(arms.values()).count("candidate") / len(KEYS)
        assert 0.4 < share < 0.6  # 50 % of 300 keys: 4 sigma is +-0.115
        assert ensured and set(ensured) == {"chat:support@2"}  # the candidate adapter is loaded first
        for key in KEYS[:30]:  # sticky: the same key, the same arm
            assert (await ask(c, key)).headers["x-raylane-arm"] == arms[key]
        # other model ids are not routed
        r = await ask(c, KEYS[0], model="chat")
        assert r.json()["served"] == "chat" and "x-raylane-arm" not in r.headers
        # a client cannot name the candidate's internal id
        r = await ask(c, KEYS[0], model="chat:support@2")
        assert r.status_code == 404

        # the counts each arm served reach storage (what the controller reads)
        await ask(c, KEYS[0], user="fail")
        recorder.flush()
        w = read_windows(str(root), "chat", state.rollout_id, 0)
        assert w["champion"].requests + w["candidate"].requests == len(KEYS) + 30 + 1
        assert w[arms[KEYS[0]]].errors == 1 and w[arms[KEYS[0]]].e2e_p95_s is not None

        # a new weight and an abort reach the router on the next read (ttl 0 here; 2 s by default)
        store.save(dataclasses.replace(state, weight=0.0))
        assert {(await ask(c, k)).headers["x-raylane-arm"] for k in KEYS[:50]} == {"champion"}
        # just promoted: the candidate keeps all traffic while replicas' alias caches move on
        import time

        promoted = dataclasses.replace(state, state="promoted", weight=100.0, updated_at=time.time())
        store.save(promoted)
        assert {(await ask(c, k)).json()["served"] for k in KEYS[:20]} == {"chat:support@2"}
        store.save(dataclasses.replace(promoted, updated_at=time.time() - 60))  # the grace is over
        assert (await ask(c, KEYS[0])).json()["served"] == "chat:support"
        store.save(state.abort())
        r = await ask(c, KEYS[0])
        assert r.json()["served"] == "chat:support" and "x-raylane-arm" not in r.headers


@pytest.mark.anyio
async def test_no_rollout_passes_through(tmp_path):
    inner = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app = CanaryRouter(inner, watch=RolloutWatch(str(tmp_path), "chat"), recorder=ArmRecorder(str(tmp_path), "chat"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/chat/completions", json={"model": "chat:support", "messages": MSG})
        assert r.json()["served"] == "chat:support" and "x-raylane-arm" not in r.headers


def test_candidate_ref_only_for_versions_of_the_adapters_model():
    adapters = {"support": "models:/bot@champion", "local": "/folder"}
    assert candidate_ref("support@7", adapters) == "models:/bot/7"
    assert candidate_ref("support", adapters) is None
    assert candidate_ref("support@x", adapters) is None
    assert candidate_ref("local@3", adapters) is None
    assert candidate_ref("other@3", adapters) is None


@pytest.mark.anyio
async def test_probe_pins_its_arm_only_with_the_token_and_is_not_counted(rig):
    c, store, state, ensured, recorder, root = rig
    probe = {"x-raylane-probe": state.probe_token}
    async with c:
        for key in KEYS[:20]:
            for arm in ("champion", "candidate"):
                r = await c.post("/v1/chat/completions", json={"model": "chat:support", "messages": MSG},
                                 headers={"Authorization": f"Bearer {key}", "x-raylane-arm": arm, **probe})
                assert r.headers["x-raylane-arm"] == arm
                assert r.json()["served"] == ("chat:support@2" if arm == "candidate" else "chat:support")
        recorder.flush()
        w = read_windows(str(root), "chat", state.rollout_id, 0)
        assert w["champion"].requests == w["candidate"].requests == 0  # the probe is not live traffic
        # without the token (or with another) the header is a wish the router ignores
        sticky = {k: (await ask(c, k)).headers["x-raylane-arm"] for k in KEYS[:40]}
        for key in KEYS[:40]:
            want = "candidate" if sticky[key] == "champion" else "champion"
            for extra in ({}, {"x-raylane-probe": "0" * 32}):
                r = await c.post("/v1/chat/completions", json={"model": "chat:support", "messages": MSG},
                                 headers={"Authorization": f"Bearer {key}", "x-raylane-arm": want, **extra})
                assert r.headers["x-raylane-arm"] == sticky[key]
        # a state written before the probe existed has no token: nothing pins
        store.save(dataclasses.replace(state, probe_token=""))
        r = await c.post("/v1/chat/completions", json={"model": "chat:support", "messages": MSG},
                         headers={"Authorization": f"Bearer {KEYS[0]}", "x-raylane-arm": "candidate",
                                  "x-raylane-probe": ""})
        assert r.headers["x-raylane-arm"] == sticky[KEYS[0]]


@pytest.mark.anyio
async def test_injected_delay_is_test_only_and_per_arm(rig, monkeypatch):
    import json
    import time

    from runtime.serving.canary import FAULTS_ENV

    c, store, state, ensured, recorder, root = rig
    faults = root / "faults.json"
    faults.write_text(json.dumps({"delay_s": {"candidate": 0.5}}))
    async with c:
        keys = {}
        for key in KEYS[:40]:
            keys.setdefault((await ask(c, key)).headers["x-raylane-arm"], key)
        for arm, key in keys.items():  # the env var unset: the file is never read
            t0 = time.monotonic()
            await ask(c, key)
            assert time.monotonic() - t0 < 0.5
        monkeypatch.setenv(FAULTS_ENV, str(faults))
        await ask(c, KEYS[0])  # the next state read (ttl 0 here) picks the file up
        for arm, key in keys.items():
            t0 = time.monotonic()
            r = await ask(c, key)
            took = time.monotonic() - t0
            assert r.headers["x-raylane-arm"] == arm
            assert (took >= 0.5) == (arm == "candidate"), (arm, took)
