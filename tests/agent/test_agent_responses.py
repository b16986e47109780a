"""The Responses API mapping (runtime.agents.responses), without Ray or an engine: a session turn
as a ``Response`` (checked against the openai SDK's own types), the stream's events replayed
through the SDK's stream accumulator, the body checks, the loop's per-turn ``instructions`` and
``max_output_tokens``, and the routes behind the guard driven by the real openai SDK in process
(the model is a scripted stand-in here; tests/agent/test_agent_serve.py runs it on real vLLM)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import Request  # at module level: FastAPI resolves the routes' string annotations here

from runtime.agents.llm import LLMReply
from runtime.agents.loop import AgentConfig, AgentLoop, new_session
from runtime.agents.responses import (
    ResponseEvents,
    ResponsesAPI,
    check_body,
    response_from_session,
    response_object,
    step_items,
    turn_input,
)
from runtime.agents.store import SQLiteStore
from runtime.agents.toolrun import LocalToolRunner
from runtime.agents.tools import load_tools
from runtime.agents.worker import (
    SessionNotFound,
    SessionQuotaExceeded,
    TurnConflict,
    owned_by,
    owner_digest,
)
from runtime.serving.guard import HTTPError
from runtime.specs import parse_spec

CALL = json.dumps({"tool": "calculator", "arguments": {"expression": "6*7"}})
ANSWER = json.dumps({"answer": "It is 42."})


def _step(n, action, **kw):
    return {"n": n, "turn": 1, "started": 100.0 + n, "action": action, "error": kw.pop("error", None),
            "llm": {"tokens_in": 50, "tokens_out": 10}, **kw}


TOOL_STEP = _step(1, "tool", tool={"name": "calculator", "kind": "tool", "arguments": {"expression": "6*7"},
                                   "ok": True, "result": "42"})
REFUSED = _step(2, "refused", tool={"name": "rm", "kind": "tool", "arguments": {}, "ok": False, "refused": True},
                error="tool rm has side effects")
ANSWER_STEP = _step(3, "answer", answer="It is 42.")
REPLY = {"type": "reply", "session_id": "s1", "turn": 1, "reply": "It is 42.", "status": "active",
         "end_reason": None, "error": None, "steps": [TOOL_STEP, REFUSED, ANSWER_STEP]}


def _sdk_response(obj):
    from openai.types.responses import Response

    return Response.model_validate(obj)  # strict: every required field, every literal


def test_a_turn_is_a_response_the_sdk_reads():
    obj = response_object(REPLY, model="helper", created_at=1.0, instructions="be brief")
    r = _sdk_response(obj)
    assert r.id == "resp_s1_1" and r.object == "response" and r.status == "completed" and r.model == "helper"
    assert r.output_text == "It is 42."
    assert [i.type for i in r.output] == ["function_call", "function_call_output", "function_call",
                                          "function_call_output", "message"]
    call, out = r.output[0], r.output[1]
    assert call.name == "calculator" and json.loads(call.arguments) == {"expression": "6*7"}
    assert out.call_id == call.call_id and out.output == "42" and out.status == "completed"
    assert r.output[3].status == "incomplete" and r.output[3].output.startswith("refused: tool rm")
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (150, 30, 180)
    assert r.instructions == "be brief" and obj["session_id"] == "s1"
    assert step_items("s1", _step(4, "invalid", error="not JSON")) == []


@pytest.mark.parametrize("patch, status, reason, error", [
    ({"reply": None, "stopped": "max_output_tokens"}, "incomplete", "max_output_tokens", None),
    ({"reply": None, "status": "ended", "end_reason": "max_steps"}, "incomplete", "max_steps", None),
    ({"reply": None, "error": "LLM call timed out after 5 s"}, "failed", None, "LLM call timed out after 5 s"),
    ({"reply": None, "status": "awaiting_approval", "end_reason": None}, "incomplete", "awaiting_approval", None),
])
def test_a_turn_without_an_answer(patch, status, reason, error):
    obj = response_object({**REPLY, "steps": [TOOL_STEP], **patch}, model="helper", created_at=1.0)
    assert (obj["incomplete_details"] or {}).get("reason") == reason
    # A budget's or a pause's name is raylane's own reason (the SDK reads it as is; its type lists OpenAI's).
    r = _sdk_response({**obj, "incomplete_details": None} if reason in ("max_steps", "awaiting_approval") else obj)
    assert r.status == status and r.output_text == ""
    assert (r.error.message if r.error else None) == error
    if error:
        assert r.error.code == "server_error"


def _replay(events):
    """Parse each event as the SDK's stream does and run its accumulator (client.responses.stream)."""
    from openai._models import construct_type
    from openai._types import omit
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    strict = TypeAdapter(ResponseStreamEvent)
    state = ResponseStreamState(input_tools=[], text_format=omit)
    fired = []
    for e in events:
        strict.validate_python(json.loads(json.dumps(e)))
        fired += state.handle_event(construct_type(type_=ResponseStreamEvent, value=e))
    return state, fired


def test_stream_events_replay_in_the_sdk():
    events = ResponseEvents(response_object({"session_id": "s1", "turn": 1, "in_progress": True},
                                            model="helper", created_at=1.0))
    out = events.start()
    for step in REPLY["steps"]:
        out += events.step("s1", step)
    out += events.finish(response_object(REPLY, model="helper", created_at=1.0))
    types = [e["type"] for e in out]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert types.count("response.output_item.added") == types.count("response.output_item.done") == 5
    assert "response.output_text.delta" in types and "response.output_text.done" in types
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    state, fired = _replay(out)
    final = state._completed_response
    assert final.id == "resp_s1_1" and final.output_text == "It is 42."
    assert "".join(e.delta for e in fired if e.type == "response.output_text.delta") == "It is 42."


def test_stream_failure_events():
    events = ResponseEvents(response_object({"session_id": "s1", "turn": 1, "in_progress": True},
                                            model="helper", created_at=1.0))
    out = events.start() + events.fail("the agent's turn failed (ActorDiedError)")
    assert [e["type"] for e in out][-2:] == ["error", "response.failed"]
    assert out[-1]["response"]["error"]["message"] == "the agent's turn failed (ActorDiedError)"
    _replay(out)


def _check(body, **kw):
    return check_body(body, model="helper", max_message_chars=50, tool_names=["calculator", "note"], **kw)


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "helper", "input": "hi", "temperature": 0}, 400, "temperature", "unknown or unsupported field(s) "
                                                                               "temperature"),
    ({"model": "helper", "input": "hi", "tools": []}, 400, "tools", "run on the server"),
    ({"input": "hi"}, 400, "model", "model is required"),
    ({"model": "gpt-4o", "input": "hi"}, 404, "model", "this endpoint serves the agent 'helper'"),
    ({"model": "helper", "input": ""}, 400, "input", "needs a user message"),
    ({"model": "helper", "input": "x" * 51}, 400, "input", "over this agent's limit of 50"),
    ({"model": "helper", "input": [{"role": "assistant", "content": "hi"}]}, 400, "input[0]",
     "continue it with previous_response_id"),
    ({"model": "helper", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, 400,
     "input[0]", "runs its own tools"),
    ({"model": "helper", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     400, "input[0].content[0]", "text only"),
    ({"model": "helper", "input": "hi", "max_output_tokens": 8}, 400, "max_output_tokens", ">= 16"),
    ({"model": "helper", "input": "hi", "stream": "yes"}, 400, "stream", "true or false"),
    ({"model": "helper", "input": "hi", "previous_response_id": "abc"}, 400, "previous_response_id",
     "resp_<session>_<turn>"),
    ({"model": "helper", "input": "hi", "previous_response_id": "resp_s1_1", "store": False}, 400, "store",
     "cannot continue one"),
    ({"model": "helper", "input": "hi", "allow_tools": ["rm"]}, 400, "allow_tools", "unknown tool(s) rm"),
])
def test_bad_bodies_name_the_field(body, status, param, words):
    with pytest.raises(HTTPError) as e:
        _check(body)
    assert e.value.status == status and e.value.param == param and words in e.value.message, e.value.message


def test_input_messages_become_the_turn():
    body = {"model": "helper", "instructions": "be brief",
            "input": [{"role": "developer", "content": "answer in French"},
                      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "2+2?"}]},
                      {"role": "user", "content": "and 3+3?"}]}
    _check(body)
    assert turn_input(body) == ("2+2?\n\nand 3+3?", "be brief\n\nanswer in French")
    assert turn_input({"input": "hi"}) == ("hi", None)


class ScriptLLM:
    """Replays a script of model replies, recording each call's messages and max_tokens."""

    def __init__(self, *replies, tokens_out=10):
        self.replies, self.tokens_out, self.calls = list(replies), tokens_out, []

    async def warm(self):
        pass

    async def chat(self, messages, *, schema, max_tokens, temperature, timeout_s):
        self.calls.append({"messages": messages, "max_tokens": max_tokens})
        content = self.replies.pop(0) if self.replies else ANSWER
        return LLMReply(content, 100, min(self.tokens_out, max_tokens), 0.01, "stop")


def _loop(tmp_path, llm, name="helper"):
    spec = parse_spec({"kind": "Agent", "name": name, "auth": "none",
                       "llm": {"url": "http://127.0.0.1:1/v1", "max_tool_rounds": 3},
                       "tools": [{"name": "calculator", "import_path": "runtime.agents.tools:calculator"}]})
    tools = load_tools(spec.tools)
    cfg = AgentConfig.from_spec(spec, tools)
    return AgentLoop(cfg, llm, LocalToolRunner(tools).call, SQLiteStore(tmp_path / "s.db")), cfg


def test_instructions_reach_the_system_message_for_their_turn_only(tmp_path):
    llm = ScriptLLM(ANSWER, ANSWER)
    loop, cfg = _loop(tmp_path, llm)
    session = new_session("s", cfg)
    asyncio.run(loop.send(session, "hi", instructions="Answer in French."))
    asyncio.run(loop.send(session, "again"))
    first, second = (c["messages"][0] for c in llm.calls)
    assert first["role"] == "system" and first["content"].endswith("Answer in French.")
    assert "French" not in second["content"]  # not carried over, as in OpenAI's API
    assert session["messages"][0]["instructions"] == "Answer in French."


def test_max_output_tokens_caps_each_call_then_stops_the_turn(tmp_path):
    llm = ScriptLLM(CALL, CALL, CALL, tokens_out=30)
    loop, cfg = _loop(tmp_path, llm)
    session = new_session("s", cfg)
    reply = asyncio.run(loop.send(session, "6*7?", max_output_tokens=76))
    assert cfg.max_tokens > 76
    assert [c["max_tokens"] for c in llm.calls] == [76, 46, 16]  # each call gets what is left: 30 + 30 + 16
    assert reply["reply"] is None and reply["stopped"] == "max_output_tokens" and reply["status"] == "active"
    assert sum(s["llm"]["tokens_out"] for s in reply["steps"]) == 76
    r = _sdk_response(response_object(reply, model="helper", created_at=1.0, max_output_tokens=76))
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


class LocalRouter:
    """SessionRouter's interface over one in-process AgentLoop (what the session actors do,
    minus Ray): ownership, quota and after_turn included."""

    def __init__(self, loop, cfg, quota=2):
        self.loop, self.cfg, self.quota, self.n = loop, cfg, quota, 0

    def _owned(self, sid, owner):
        s = self.loop.store.load(sid)
        if s is None or not owned_by(s, owner):
            raise SessionNotFound(sid)
        return s

    async def create(self, owner=None, allowed_tools=None):
        self.n += 1
        session = new_session(f"sess{self.n}", self.cfg, owner, allowed_tools or ())
        if not self.loop.store.create(session, self.quota):
            raise SessionQuotaExceeded(session["id"])
        return {"id": session["id"]}

    async def get(self, sid, owner=None):
        return self._owned(sid, owner)

    async def delete(self, sid, owner=None):
        self.loop.store.delete(self._owned(sid, owner))
        return {"id": sid, "deleted": True}

    def _at(self, sid, owner, options):
        options = dict(options or {})
        after = options.pop("after_turn", None)
        s = self._owned(sid, owner)
        if after is not None and s["turn"] != after:
            raise TurnConflict(sid)
        return s, options

    async def send(self, sid, content, owner=None, options=None):
        s, options = self._at(sid, owner, options)
        return await self.loop.send(s, content, **options)

    async def send_stream(self, sid, content, owner=None, options=None):
        s, options = self._at(sid, owner, options)
        async for event in self.loop.turn(s, content, **options):
            yield event


KEY, OTHER = "k-one", "k-two"


def _app(router):
    """The ingress's guard and the two routes, as app.py mounts them (no Serve)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from runtime.agents.app import ROUTES, request_validator
    from runtime.serving.guard import GuardMiddleware, error_body

    api = FastAPI()
    api.add_middleware(GuardMiddleware, keys={KEY, OTHER}, routes=ROUTES,
                       validate_body=request_validator(2000, ["calculator"], model="helper"))
    responses = ResponsesAPI(router, model="helper", quota=2)

    def owner(request):
        return owner_digest(request.headers["authorization"].partition(" ")[2])

    @api.exception_handler(HTTPError)
    async def _err(request, exc):
        return JSONResponse(status_code=exc.status, content=json.loads(error_body(exc.status, exc.message, exc.type,
                                                                                    "", exc.param)))

    @api.post("/v1/responses")
    async def create(request: Request):
        return await responses.create(request, owner(request))

    @api.get("/v1/responses/{rid}")
    async def get(rid: str, request: Request):
        return await responses.retrieve(rid, owner(request))

    return api


def test_the_openai_sdk_drives_the_routes(tmp_path):
    import httpx2
    import openai

    llm = ScriptLLM(CALL, ANSWER, CALL, ANSWER, ANSWER, ANSWER)
    loop, cfg = _loop(tmp_path, llm)
    router = LocalRouter(loop, cfg)
    app = _app(router)

    def client(key):
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://agent")
        return openai.AsyncOpenAI(base_url="http://agent/v1", api_key=key, http_client=http, max_retries=0)

    async def go():
        c, other = client(KEY), client(OTHER)
        first = await c.responses.create(model="helper", input="What is 6 * 7?")
        assert first.status == "completed" and first.output_text == "It is 42."
        assert [i.type for i in first.output] == ["function_call", "function_call_output", "message"]
        second = await c.responses.create(model="helper", input="And again?", previous_response_id=first.id,
                                          instructions="be brief")
        assert second.id == first.id[:-1] + "2" and second.previous_response_id == first.id
        session = await router.get(first.model_extra["session_id"], owner_digest(KEY))
        users = [m["content"] for m in session["messages"] if m["role"] == "user"]
        assert users == ["What is 6 * 7?", "And again?"] and session["turn"] == 2
        assert "What is 6 * 7?" in json.dumps(llm.calls[2]["messages"])  # the second turn saw the first
        got = await c.responses.retrieve(second.id)
        assert got.output_text == second.output_text and got.instructions == "be brief"
        with pytest.raises(openai.BadRequestError, match="not the latest response"):
            await c.responses.create(model="helper", input="fork", previous_response_id=first.id)
        for call in (other.responses.create(model="helper", input="hi", previous_response_id=second.id),
                     other.responses.retrieve(second.id)):
            with pytest.raises(openai.NotFoundError, match="no response"):
                await call
        with pytest.raises(openai.NotFoundError, match="serves the agent 'helper'"):
            await c.responses.create(model="gpt-4o", input="hi")
        with pytest.raises(openai.BadRequestError, match="temperature") as e:
            await c.responses.create(model="helper", input="hi", temperature=0.5)
        assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
        async with c.responses.stream(model="helper", input="3+3?", previous_response_id=second.id) as s:
            types = [e.type async for e in s]
            final = await s.get_final_response()
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert final.output_text == "It is 42." and final.id.endswith("_3")
        raw = [e async for e in await c.responses.create(model="helper", input="4+4?", stream=True,
                                                         previous_response_id=final.id)]
        assert raw[-1].type == "response.completed" and raw[-1].response.output_text == "It is 42."
        assert raw[0].response.id == raw[-1].response.id == final.id[:-1] + "4"
        # store: false runs in a session deleted once the response is complete (quota 2: it needs a place)
        gone = await c.responses.create(model="helper", input="hi", store=False)
        assert gone.status == "completed"
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(gone.id)
        await c.responses.create(model="helper", input="hi")  # the key's second session
        with pytest.raises(openai.RateLimitError, match="max_sessions_per_key"):
            await c.responses.create(model="helper", input="hi")
        r = await c._client.get("http://agent/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and "not served" in r.json()["error"]["message"]  # the allow-list

    asyncio.run(go())


def test_a_stored_response_is_rebuilt_from_the_session(tmp_path):
    loop, cfg = _loop(tmp_path, ScriptLLM(CALL, ANSWER, ANSWER))
    session = new_session("s", cfg)
    first = asyncio.run(loop.send(session, "6*7?", instructions="be brief"))
    asyncio.run(loop.send(session, "again"))
    posted = response_object(first, model="helper", created_at=1.0, instructions="be brief")
    stored = response_from_session(session, 1, model="helper")
    for key in ("id", "status", "output", "usage", "instructions"):
        assert stored[key] == posted[key], key
    assert stored["output"][1]["output"] == "42"  # the calculator really ran
    latest = response_from_session(session, 2, model="helper")
    assert latest["previous_response_id"] == "resp_s_1" and latest["instructions"] is None
    _sdk_response(latest)
