"""Base-model rollouts (``rollout.adapter: null``) without Ray or an engine: the candidate engine's
lifecycle (``runtime.release.engine.engine_turn``) against a recording stand-in for Serve, and the
router's forwarding of the candidate arm to the candidate app (a fake handle stream), inside the guard."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from runtime.release.decide import Decision
from runtime.release.engine import HANDOVER_DRAIN_S, REDEPLOY_SETTLE_S, candidate_spec, engine_turn
from runtime.release.state import RolloutState, RolloutStore
from runtime.release.windows import ArmRecorder, read_windows
from runtime.serving.canary import CanaryRouter, RolloutWatch
from runtime.serving.guard import GuardMiddleware

SPEC = {"kind": "OnlineInference", "name": "chat", "model": "models:/base@champion", "model_id": "m",
        "auth": "api-key", "storage": {"root": "/tmp/x"}}
KEYS = [f"key-{i}" for i in range(200)]


def base_state(now=1000.0, **config) -> RolloutState:
    return RolloutState.start(name="chat", app="chat", model_id="m", champion="models:/base/1",
                              candidate="models:/base/2", config={"steps": [50, 100], **config}, now=now,
                              serve_spec=dict(SPEC))


class FakeServe:
    """Serve as the controller sees it: app statuses set by the test, every call recorded."""

    def __init__(self, fail_deploy: Exception | None = None):
        self.apps: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_deploy = fail_deploy

    def status(self, app):
        return self.apps.get(app)

    def deploy_candidate(self, state):
        self.calls.append(("deploy", state.candidate_app))
        if self.fail_deploy:
            raise self.fail_deploy
        self.apps[state.candidate_app] = ("DEPLOYING", "")
        return "RaylaneLLMServer:m"

    def redeploy_champion(self, state):
        self.calls.append(("redeploy", state.app))
        self.apps[state.app] = ("DEPLOYING", "")

    def delete(self, app):
        self.calls.append(("delete", app))
        self.apps.pop(app, None)


def test_the_candidate_spec_is_the_champions_on_the_pinned_candidate_with_auth_on():
    spec = candidate_spec(base_state())
    assert (spec.name, spec.model, spec.served_model_id, spec.adapters, spec.rollout, spec.auth) == \
        ("chat-candidate", "models:/base/2", "m", {}, None, "api-key")


def test_start_deploys_once_holds_until_running_then_starts_the_step_clock():
    serve, st = FakeServe(), base_state()
    assert (st.engine, st.live, st.base) == ("starting", False, True)
    st = engine_turn(st, serve, now=1001)
    assert serve.calls == [("deploy", "chat-candidate")] and st.engine_deployment == "RaylaneLLMServer:m"
    assert st.reason.startswith("candidate engine starting") and not st.live and st.state == "progressing"
    assert engine_turn(st, serve, now=1010) is None  # DEPLOYING: nothing written
    assert engine_turn(dataclasses.replace(st), serve, now=1011) is None and serve.calls == [("deploy", "chat-candidate")]
    serve.apps["chat-candidate"] = ("RUNNING", "")
    st = engine_turn(st, serve, now=1060)
    assert (st.engine, st.live, st.step_started_at, st.step) == ("running", True, 1060, 0)
    assert "candidate engine running" in st.reason and "step 1/2" in st.reason
    assert engine_turn(st, serve, now=1061) is None  # running: the decisions take over
    assert [h["engine"] for h in st.history] == ["starting", "running"]


def test_a_restarted_controller_finds_the_deployed_app():
    serve, st = FakeServe(), base_state()
    serve.apps["chat-candidate"] = ("DEPLOYING", "")  # a predecessor deployed it before dying
    assert engine_turn(st, serve, now=1005) is None and serve.calls == []


@pytest.mark.parametrize("setup, words", [
    (lambda s: setattr(s, "fail_deploy", ValueError("model not found")), "failed to deploy: ValueError: model not found"),
    (lambda s: s.apps.__setitem__("chat-candidate", ("DEPLOY_FAILED", "Traceback...\nOOM in engine")),
     "is DEPLOY_FAILED: OOM in engine"),
    (lambda s: s.apps.__setitem__("chat-candidate", ("DEPLOYING", "waiting for resources")),
     "not RUNNING within candidate_start_timeout_s=60s (it is DEPLOYING: waiting for resources)"),
])
def test_a_candidate_engine_that_fails_or_times_out_rolls_back_and_is_deleted(setup, words):
    serve, st = FakeServe(), base_state(candidate_start_timeout_s=60)
    setup(serve)
    st = engine_turn(st, serve, now=1100)
    assert st.state == "rolled_back" and st.weight == 0 and words in st.reason, st.reason
    assert st.history[-1]["check"] == "candidate_engine"
    st = engine_turn(st, serve, now=1101)  # the next turn winds it down
    assert st.engine == "deleted" and "candidate app chat-candidate deleted" in st.reason
    assert "chat-candidate" not in serve.apps and engine_turn(st, serve, now=1102) is None


def test_abort_deletes_the_candidate_app():
    serve, st = FakeServe(), base_state()
    st = engine_turn(st, serve, now=1001)
    serve.apps["chat-candidate"] = ("RUNNING", "")
    st = engine_turn(st, serve, now=1002).abort("by hand", now=1003)
    st = engine_turn(st, serve, now=1004)
    assert (st.state, st.engine, serve.calls[-1]) == ("aborted", "deleted", ("delete", "chat-candidate"))


def test_promotion_redeploys_the_champion_hands_over_then_deletes_the_candidate():
    serve, st = FakeServe(), base_state()
    st = engine_turn(st, serve, now=1001)
    serve.apps.update({"chat-candidate": ("RUNNING", ""), "chat": ("RUNNING", "")})
    st = engine_turn(st, serve, now=1002)
    st = st.apply(Decision(verdict="promote", reason="checks pass"), now=1100)
    st = engine_turn(st, serve, now=1101)
    assert (st.engine, serve.calls[-1]) == ("redeploying", ("redeploy", "chat"))
    assert engine_turn(st, serve, now=1102) is None  # the champion app is DEPLOYING
    serve.apps["chat"] = ("RUNNING", "")
    assert engine_turn(st, serve, now=1101 + REDEPLOY_SETTLE_S / 2) is None  # too soon to trust RUNNING
    st = engine_turn(st, serve, now=1101 + REDEPLOY_SETTLE_S)
    assert st.engine == "handed_over" and "runs models:/base/2" in st.reason and st.state == "promoted"
    assert engine_turn(st, serve, now=st.engine_since + 1) is None  # replicas re-read the state first
    st = engine_turn(st, serve, now=st.engine_since + HANDOVER_DRAIN_S)
    assert st.engine == "deleted" and "chat-candidate" not in serve.apps
    assert [c for c, _ in serve.calls] == ["deploy", "redeploy", "delete"]
    assert [h["engine"] for h in st.history if h["verdict"] == "engine"] == \
        ["starting", "running", "redeploying", "handed_over", "deleted"]


def test_an_adapter_rollout_has_no_engine():
    st = RolloutState.start(name="chat", app="chat", model_id="m:a", champion="models:/a/1",
                            candidate="models:/a/2", config={"steps": [100]})
    assert (st.base, st.live, engine_turn(st, FakeServe())) == (False, True, None)
    assert RolloutState.from_json(st.to_json()) == st
    assert RolloutState.from_json(base_state().to_json()).serve_spec == SPEC


# --- the router ---------------------------------------------------------------------------------

async def completions(request):
    body = await request.json()
    if body.get("stream"):
        async def chunks():
            for i in range(3):
                yield f"data: champion {i}\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")
    return JSONResponse({"model": body["model"], "by": "champion"})


def candidate_app(received: list):
    """What the candidate app's forward_asgi streams back: its own response messages, one chunk
    at a time (a streamed body stays streamed)."""
    async def forward(state, scope, body):
        received.append((scope, body))
        yield {"type": "http.response.start", "status": 200,
               "headers": [(b"content-type", b"application/json"), (b"content-length", b"30")]}
        for part in (b'{"model":"m",', b'"by":"candidate"}'):
            yield {"type": "http.response.body", "body": part, "more_body": True}
        yield {"type": "http.response.body", "body": b"", "more_body": False}
    return forward


@pytest.fixture
def rig(tmp_path):
    store = RolloutStore(str(tmp_path))
    state = base_state(now=None)
    store.save(state)
    received: list = []
    recorder = ArmRecorder(str(tmp_path), "chat", replica="r0")
    inner = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    router = CanaryRouter(inner, watch=RolloutWatch(str(tmp_path), "chat", ttl_s=0), recorder=recorder,
                          flush_s=0, forward=candidate_app(received))
    app = GuardMiddleware(router, keys=set(KEYS))
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return c, store, state, received, recorder, tmp_path


async def ask(c, key, model="m", **extra):
    return await c.post("/v1/completions", json={"model": model, "prompt": "hi", **extra},
                        headers={"Authorization": f"Bearer {key}"})


@pytest.mark.anyio
async def test_nothing_reaches_the_candidate_app_before_its_engine_runs(rig):
    c, store, state, received, recorder, root = rig
    async with c:
        for key in KEYS[:40]:
            r = await ask(c, key)
            assert r.json()["by"] == "champion" and "x-raylane-arm" not in r.headers
    assert received == []


@pytest.mark.anyio
async def test_the_candidate_arm_is_forwarded_to_the_candidate_app(rig):
    c, store, state, received, recorder, root = rig
    state = state.engine_step("running", "candidate engine running", engine_deployment="RaylaneLLMServer:m")
    store.save(state)
    async with c:
        arms = {}
        for key in KEYS:
            r = await ask(c, key)
            assert r.status_code == 200
            arms[key] = r.headers["x-raylane-arm"]
            want = {"champion": "models:/base/1", "candidate": "models:/base/2"}[arms[key]]
            assert (r.json()["by"], r.headers["x-raylane-model-version"]) == (arms[key], want)
            assert r.json()["model"] == "m"
        assert 0.35 < list(arms.values()).count("candidate") / len(KEYS) < 0.65
        scope, body = received[0]
        assert set(scope) <= {"type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
                              "query_string", "root_path", "headers", "client", "server"}
        assert scope["path"] == "/v1/completions" and b'"model": "m"' in body or b'"model":"m"' in body
        assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in scope["headers"])
        # the probe pins its arm with the rollout's token
        pinned = await c.post("/v1/completions", json={"model": "m", "prompt": "hi"},
                              headers={"Authorization": f"Bearer {KEYS[0]}", "x-raylane-arm": "candidate",
                                       "x-raylane-probe": state.probe_token})
        assert pinned.json()["by"] == "candidate"
        # other ids are not routed
        r = await ask(c, KEYS[0], model="other")
        assert "x-raylane-arm" not in r.headers
    recorder.flush()
    win = read_windows(str(root), "chat", state.rollout_id, 0)
    n = list(arms.values()).count("candidate")
    assert (win["candidate"].requests, win["champion"].requests) == (n, len(KEYS) - n)  # the probe not counted
    assert win["candidate"].ttft_p95_s is not None


@pytest.mark.anyio
async def test_after_a_promotion_the_candidate_app_serves_everything_until_the_handover(rig):
    c, store, state, received, recorder, root = rig
    state = state.engine_step("running", "up", engine_deployment="RaylaneLLMServer:m")
    state = state.apply(Decision(verdict="promote", reason="pass"))
    for engine, by in (("running", "candidate"), ("redeploying", "candidate"), ("handed_over", "champion")):
        store.save(dataclasses.replace(state, engine=engine))
        async with httpx.AsyncClient(transport=c._transport, base_url="http://t") as cc:
            for key in KEYS[:20]:
                assert (await ask(cc, key)).json()["by"] == by, engine
