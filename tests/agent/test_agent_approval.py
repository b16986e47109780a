"""Unit tier (no Ray, no engine): idempotency keys, human approval of a tool call, and the reuse
of recorded side effects when a step is retried. The model is a scripted stand-in (the logic
under test needs no engine); the tool really appends to a file and the store is real SQLite.
The same paths on the real engine and session actors: test_agent_serve.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from runtime.agents.llm import LLMReply
from runtime.agents.loop import AgentConfig, AgentLoop, ApprovalError, idempotency_key, new_session
from runtime.agents.store import SQLiteStore
from runtime.agents.toolrun import LocalToolRunner
from runtime.agents.tools import load_tools, schema_from_signature, takes_key
from runtime.errors import SpecError
from runtime.specs import parse_spec

BUDGETS = {"max_steps": 8, "max_tokens": 10_000, "max_wall_s": 60, "max_tool_failures": 2, "max_invalid_calls": 1}


class Scripted:
    """Replies in order (a stand-in for the model: what it says is not what these tests check)."""

    def __init__(self, *replies: dict):
        self.replies = [json.dumps(r) for r in replies]

    async def chat(self, messages, **_):
        return LLMReply(self.replies.pop(0), 10, 5, 0.001)


class Died(BaseException):
    """Stands for the actor's death between the recorded result and the step's save."""


def make(tmp_path: Path, *replies: dict, approval=True, idempotent=False, side_effects=True):
    effects = tmp_path / "effects.txt"
    spec = parse_spec({"kind": "Agent", "name": "t", "auth": "none", "tools": [{
        "name": "append", "import_path": "examples.tools:append_line", "side_effects": side_effects,
        "requires_approval": approval, "idempotent": idempotent,
        "parameters": {"type": "object", "properties": {"file": {"type": "string"}, "text": {"type": "string"}},
                       "required": ["file", "text"], "additionalProperties": False}}]})
    tools = load_tools(spec.tools)
    config = AgentConfig("t", "sys", tools, BUDGETS, max_tool_rounds=2)
    store = SQLiteStore(tmp_path / "sessions.db")
    loop = AgentLoop(config, Scripted(*replies), LocalToolRunner(tools).call, store)
    session = new_session("s1", config, allowed_tools=["append"])
    store.create(session)
    return loop, store, session, effects


def call(effects: Path, text: str) -> dict:
    return {"tool": "append", "arguments": {"file": str(effects), "text": text}}


def lines(effects: Path) -> list[list[str]]:
    return [line.split("\t") for line in effects.read_text().splitlines()] if effects.exists() else []


def drain(gen) -> dict:
    async def go():
        last = {}
        async for event in gen:
            last = event
        return last

    return asyncio.run(go())


def test_idempotency_key_is_deterministic_per_session_step_and_call():
    k = idempotency_key("s1", 3)
    assert k == idempotency_key("s1", 3, 0) and len(k) == 32 and int(k, 16) >= 0
    others = {idempotency_key("s1", 4), idempotency_key("s1", 3, 1), idempotency_key("s2", 3)}
    assert k not in others and len(others) == 3
    assert "s1" not in k  # the session id (a capability) never reaches a tool


def test_python_tools_receive_the_key_only_when_they_declare_it():
    from examples.tools import append_line, word_count

    assert takes_key(append_line) and not takes_key(word_count) and takes_key(lambda **kw: kw)
    assert "idempotency_key" not in schema_from_signature(append_line)["properties"]  # the model never sees it


def test_approval_pauses_then_approve_with_edited_arguments_runs_once_and_continues(tmp_path):
    loop, store, session, effects = make(tmp_path, None, {"answer": "done"})
    loop.llm.replies[0] = json.dumps(call(effects, "draft"))
    reply = asyncio.run(loop.send(session, "write it"))
    assert reply["status"] == "awaiting_approval" and reply["reply"] is None
    pending = reply["pending_approval"]
    assert pending["tool"] == "append" and pending["arguments"]["text"] == "draft"
    assert pending["call_id"] == idempotency_key("s1", 1) == reply["steps"][-1]["tool"]["call_id"]
    assert reply["steps"][-1]["action"] == "awaiting_approval" and lines(effects) == []  # nothing ran
    saved = store.load("s1")
    assert saved["status"] == "awaiting_approval" and saved["pending_approval"] == pending and not saved["turn_open"]

    paused = asyncio.run(loop.send(saved, "another message"))  # no new turn while paused
    assert paused["steps"] == [] and paused["status"] == "awaiting_approval" and store.load("s1")["turn"] == 1

    with pytest.raises(ApprovalError) as e:
        loop.check_decision(saved, "c-other", "approve", None)
    assert e.value.status == 409 and pending["call_id"] in e.value.message and e.value.param == "call_id"
    with pytest.raises(ApprovalError) as e:
        loop.check_decision(saved, pending["call_id"], "approve", {"file": str(effects)})
    assert e.value.status == 400 and e.value.param == "arguments" and "'text' is a required property" in e.value.message
    with pytest.raises(ApprovalError) as e:
        loop.check_decision(saved, pending["call_id"], "reject", {"file": str(effects), "text": "x"})
    assert e.value.status == 400 and "only for approve" in e.value.message

    edited = {"file": str(effects), "text": "final"}
    reply = drain(loop.resolve(store.load("s1"), pending["call_id"], "approve", edited, "looks right"))
    assert reply["status"] == "active" and reply["reply"] == "done" and reply["pending_approval"] is None
    first = reply["steps"][0]
    assert first["n"] == 1 and first["action"] == "tool" and first["tool"]["ok"] and first["tool"]["arguments"] == edited
    assert first["approval"]["decision"] == "approve" and first["approval"]["edited"] is True
    assert lines(effects) == [[pending["call_id"], "final"]]  # ran once, with the edited text and the call's key
    saved = store.load("s1")
    assert [s["action"] for s in saved["steps"]] == ["tool", "answer"] and saved["calls"] == {}
    assert any("edited arguments" in m["content"] for m in saved["messages"] if m["role"] == "feedback")
    with pytest.raises(ApprovalError) as e:  # decided: nothing pending any more
        loop.check_decision(saved, pending["call_id"], "approve", None)
    assert e.value.status == 409


def test_reject_feeds_the_model_a_refused_step_with_the_reason(tmp_path):
    loop, store, session, effects = make(tmp_path, None, {"answer": "ok, not sent"})
    loop.llm.replies[0] = json.dumps(call(effects, "spam"))
    pending = asyncio.run(loop.send(session, "send it"))["pending_approval"]
    reply = drain(loop.resolve(store.load("s1"), pending["call_id"], "reject", None, "wrong recipient"))
    refused = reply["steps"][0]
    assert refused["action"] == "refused" and refused["tool"]["refused"] and "wrong recipient" in refused["error"]
    assert reply["reply"] == "ok, not sent" and lines(effects) == []
    saved = store.load("s1")
    assert saved["errors"]["tool_rejected:append"] == 1 and saved["usage"]["tool_calls"] == 0
    prompt = loop.prompt(saved)
    assert any("rejected this call of append: wrong recipient" in m["content"] for m in prompt)


def test_a_step_retried_after_a_crash_reuses_the_recorded_result(tmp_path):
    loop, store, session, effects = make(tmp_path, None, {"answer": "done"}, approval=False)
    loop.llm.replies[0] = json.dumps(call(effects, "once"))

    def die(session, key):
        raise Died

    loop.after_record = die
    with pytest.raises(Died):
        asyncio.run(loop.send(session, "do it"))
    crashed = store.load("s1")  # what the store holds after the crash: the result, not the step
    key = idempotency_key("s1", 1)
    assert crashed["turn_open"] and crashed["steps"] == [] and crashed["calls"][key]["out"]["ok"]
    assert len(lines(effects)) == 1
    loop.after_record = None
    step = asyncio.run(loop.settle(crashed))
    assert step["n"] == 1 and step["resumed"] and step["tool"]["reused"] and step["tool"]["idempotency_key"] == key
    assert lines(effects) == [[key, "once"]]  # not run again
    saved = store.load("s1")
    assert saved["calls"] == {} and saved["usage"]["steps"] == 1 and saved["usage"]["tool_calls"] == 1
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "tool"]  # nothing duplicated
    assert asyncio.run(loop.settle(saved)) is None  # nothing left to finish


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_call_cut_off_before_its_result_is_at_most_once_unless_the_tool_is_idempotent(tmp_path, idempotent):
    loop, store, session, effects = make(tmp_path, approval=False, idempotent=idempotent)
    key = idempotency_key("s1", 1)
    action = call(effects, "maybe")
    session.update(turn=1, turn_open=True)
    session["messages"] = [{"role": "user", "content": "x", "turn": 1},
                           {"role": "assistant", "content": json.dumps(action), "turn": 1}]
    session["calls"] = {key: {"action": action, "step": {"n": 1, "turn": 1, "action": None, "error": None}}}
    step = asyncio.run(loop.settle(session))  # the intent, no result: the actor died during the call
    if idempotent:  # re-sent with the same key: the tool's own dedup makes it exactly once
        assert step["tool"]["ok"] and lines(effects) == [[key, "maybe"]]
    else:
        assert not step["tool"]["ok"] and step["tool"]["unknown_outcome"] and lines(effects) == []
        assert "may or may not have taken effect" in step["error"]


def test_an_approved_call_whose_run_died_is_finished_once_by_repeating_the_decision(tmp_path):
    loop, store, session, effects = make(tmp_path, None, {"answer": "sent"})
    loop.llm.replies[0] = json.dumps(call(effects, "pay"))
    pending = asyncio.run(loop.send(session, "pay it"))["pending_approval"]

    def die(session, key):
        raise Died

    loop.after_record = die
    with pytest.raises(Died):
        drain(loop.resolve(store.load("s1"), pending["call_id"], "approve"))
    assert store.load("s1")["status"] == "awaiting_approval" and len(lines(effects)) == 1
    loop.after_record = None
    reply = drain(loop.resolve(store.load("s1"), pending["call_id"], "approve"))  # the client's retry
    assert reply["reply"] == "sent" and reply["steps"][0]["tool"]["reused"] is True
    assert lines(effects) == [[pending["call_id"], "pay"]]


def test_spec_declares_approval_for_tools_and_mcp_tools():
    spec = parse_spec({"kind": "Agent", "name": "a", "auth": "none",
                       "tools": [{"name": "w", "import_path": "examples.tools:word_count", "requires_approval": True}],
                       "mcp_servers": [{"name": "m", "transport": "stdio", "command": "python", "allow_tools": ["a", "b"],
                                        "requires_approval": ["b"], "idempotent": ["b"]}]})
    assert load_tools(spec.tools)[0].requires_approval
    with pytest.raises(SpecError) as e:
        parse_spec({"kind": "Agent", "name": "a", "auth": "none", "mcp_servers": [
            {"name": "m", "transport": "stdio", "command": "python", "allow_tools": ["a"], "requires_approval": ["x"]}]})
    assert "requires_approval names tools not in allow_tools: x" in str(e.value)
    from runtime.agents.mcptools import McpTools

    class Listed:
        def __init__(self, name):
            self.name, self.description, self.title, self.annotations = name, name, None, None
            self.input_schema = {"type": "object", "properties": {}}

    tools = McpTools._tools(spec.mcp_servers[0].model_dump(), "m", [Listed("a"), Listed("b")])
    assert [(t.name, t.requires_approval, t.idempotent, t.takes_key) for t in tools] == [
        ("m__a", False, False, True), ("m__b", True, True, True)]


@pytest.mark.parametrize("body,param,words", [
    ([], None, "JSON object"),
    ({"decision": "approve"}, "call_id", "pending call's id"),
    ({"call_id": "c", "decision": "maybe"}, "decision", '"approve" or "reject"'),
    ({"call_id": "c", "decision": "approve", "arguments": [1]}, "arguments", "JSON object"),
    ({"call_id": "c", "decision": "reject", "reason": "x" * 2001}, "reason", "at most 2000"),
    ({"call_id": "c", "decision": "reject", "why": "x"}, "why", "unknown field(s) why"),
])
def test_approval_body_errors_name_the_field(body, param, words):
    from runtime.agents.app import request_validator
    from runtime.serving.guard import HTTPError

    with pytest.raises(HTTPError) as e:
        request_validator(100, [])("/sessions/abc/approvals", body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_ordinary_tools_are_not_recorded(tmp_path):
    saves = []
    loop, store, session, effects = make(tmp_path, None, {"answer": "x"}, approval=False, side_effects=False)
    loop.llm.replies[0] = json.dumps(call(effects, "free"))
    real_save = store.save
    store.save = lambda s: (saves.append(json.loads(json.dumps(s.get("calls")))), real_save(s))
    asyncio.run(loop.send(session, "go"))
    assert all(c == {} for c in saves)  # no intent/result writes for a tool without side effects
    assert store.load("s1")["steps"][0]["tool"]["idempotency_key"] == idempotency_key("s1", 1)
