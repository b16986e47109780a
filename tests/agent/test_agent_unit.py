"""Unit tier (no Ray, no engine): the spec, action parsing, tools, embeddings, stores, configs."""

from __future__ import annotations

import json

import pytest

from runtime.agents.loop import AgentConfig, action_schema, new_session, parse_action
from runtime.agents.retrieval import chunk_text, embed_texts
from runtime.agents.store import SQLiteStore, open_store
from runtime.agents.tools import Tool, calculator, load_tools
from runtime.errors import RaylaneError, SpecError
from runtime.specs import load_spec, parse_spec
from tests.conftest import EXAMPLES

BASE = {"kind": "Agent", "name": "helper", "auth": "none"}


def _config(tools):
    return AgentConfig("helper", "sys", tools, {"max_steps": 4, "max_tokens": 100, "max_wall_s": 10,
                                                "max_tool_failures": 1, "max_invalid_calls": 1})


def test_example_spec_loads_with_tools_and_retrieval():
    spec = load_spec(EXAMPLES / "agent.yaml")
    tools = load_tools(spec.tools, spec.retrieval, "/tmp/nowhere")
    assert [t.name for t in tools] == ["calculator", "retrieve"]
    assert tools[1].kind == "retrieval" and tools[1].bound["_top_k"] == 2


@pytest.mark.parametrize("patch, path, words", [
    ({"tools": [{"name": "bad name", "import_path": "m:f"}]}, "tools[0].name", "letters"),
    ({"tools": [{"name": "calc", "import_path": "no-colon"}]}, "tools[0].import_path", "module:function"),
    ({"tools": [{"name": "retrieve", "import_path": "m:f"}]}, "tools[0].name", "reserved"),
    ({"sessions": {"backend": "redis"}}, "sessions", "redis://"),
    ({"budgets": {"max_step": 3}}, "budgets.max_step", "did you mean 'max_steps'"),
    ({"llm": {"url": "localhost:8000"}}, "llm", "http://"),
    ({"retrieval": {"corpus": "sample", "chunk_chars": 40, "chunk_overlap": 40}}, "retrieval", "smaller"),
])
def test_spec_errors_name_the_field(patch, path, words):
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, **patch})
    assert path in str(e.value) and words in str(e.value)


def test_duplicate_tool_names_rejected():
    t = {"name": "calc", "import_path": "runtime.agents.tools:calculator"}
    with pytest.raises(SpecError, match="repeated: calc"):
        parse_spec({**BASE, "tools": [t, t]})


def test_unknown_tool_module_is_a_clear_error():
    spec = parse_spec({**BASE, "tools": [{"name": "x", "import_path": "no_such_module:f"}]})
    with pytest.raises(RaylaneError, match="cannot import 'no_such_module'"):
        load_tools(spec.tools)


def test_calculator():
    assert calculator(expression="2 * (3 + 4)") == "14"
    assert calculator(expression="7 / 2") == "3.5"
    with pytest.raises(ValueError, match="unsupported"):
        calculator(expression="__import__('os')")
    with pytest.raises(ValueError, match="not an arithmetic"):
        calculator(expression="8 /")


def test_calculator_schema_only_admits_expressions_it_can_parse():
    import re

    pattern = re.compile(calculator.PARAMETERS["properties"]["expression"]["pattern"])
    for expr in ["8", "-12 * 3", "1+2-3/4", "999999 * 2 + 1"]:
        assert pattern.match(expr)
        calculator(expression=expr)
    assert not pattern.match("8 /") and not pattern.match("os.system")


CALC = Tool("calculator", "runtime.agents.tools:calculator", "calc", calculator.PARAMETERS)


@pytest.mark.parametrize("content, problem", [
    ('{"tool": "calculator", "argum', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"tool": "search", "arguments": {}}', "unknown tool 'search'"),
    ('{"tool": "calculator", "arguments": {"expression": 3}}', "invalid arguments for calculator: expression"),
    ('{"tool": "calculator", "arguments": {}}', "'expression' is a required property"),
    ('{"answer": "x", "extra": 1}', "exactly"),
])
def test_parse_action_reports_what_is_wrong(content, problem):
    action, err = parse_action(content, _config([CALC]))
    assert action is None and problem in err


def test_parse_action_accepts_calls_and_answers():
    cfg = _config([CALC])
    assert parse_action('{"tool":"calculator","arguments":{"expression":"1+1"}}', cfg) == (
        {"tool": "calculator", "arguments": {"expression": "1+1"}}, None)
    assert parse_action('{"answer":"hi"}', cfg) == ({"answer": "hi"}, None)


def test_action_schema_offers_what_the_turn_allows():
    from jsonschema import Draft202012Validator

    both = Draft202012Validator(action_schema([CALC], True, True, 10))
    assert both.is_valid({"tool": "calculator", "arguments": {"expression": "1+1"}})
    assert both.is_valid({"answer": "ok"})
    assert not both.is_valid({"answer": "x" * 11})
    tools_only = Draft202012Validator(action_schema([CALC], True, False, 10))
    assert not tools_only.is_valid({"answer": "ok"})
    answer_only = Draft202012Validator(action_schema([CALC], False, True, 10))
    assert not answer_only.is_valid({"tool": "calculator", "arguments": {"expression": "1"}})


def test_chunks_overlap_and_cover_the_text():
    text = " ".join(f"w{i}" for i in range(200))
    chunks = chunk_text(text, 100, 20)
    assert all(len(c) <= 100 for c in chunks)
    assert chunks[0][-20:] == chunks[1][:20]
    assert chunks[-1].endswith("w199")


def test_hashed_embedding_is_deterministic_and_matches_shared_words():
    a, b, c = embed_texts(["Ray Serve deploys replicas", "Serve replicas deploy", "budgets end sessions"], 256)
    assert embed_texts(["Ray Serve deploys replicas"], 256)[0].tolist() == a.tolist()
    assert float(a @ b) > 0.3 > float(a @ c)


def test_sqlite_store_roundtrip(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    s = new_session("abc", _config([]))
    store.save(s)
    s["messages"].append({"role": "user", "content": "hi"})
    store.save(s)
    again = SQLiteStore(tmp_path / "s.db")  # a new process would open it the same way
    assert again.load("abc")["messages"] == [{"role": "user", "content": "hi"}]
    assert again.list_ids() == ["abc"] and again.load("nope") is None


def test_sqlite_store_refuses_remote_paths():
    with pytest.raises(RaylaneError, match="local path"):
        open_store("sqlite", None, "s3://bucket/runs/x")


def test_redis_store_unreachable_is_a_clear_error():
    with pytest.raises(RaylaneError, match="cannot reach the session store"):
        open_store("redis", "redis://127.0.0.1:1/0", "/tmp")


def test_serve_config_has_agent_and_llm_apps_with_the_spec_embedded():
    from runtime.agents.config import build_agent_serve_config

    spec = load_spec(EXAMPLES / "agent.yaml")
    cfg = build_agent_serve_config(spec)
    llm, agent = cfg["applications"]  # dependencies first: deployed in this order
    assert agent["import_path"] == "serve_apps.agent:build_agent_app"
    assert parse_spec(agent["args"]["spec"]) == spec
    assert llm["name"] == "helper-llm" and llm["route_prefix"] == "/llm"
    llm_spec = parse_spec(llm["args"]["spec"])
    assert llm_spec.engine_kwargs["structured_outputs_config"]["disable_any_whitespace"] is True
    json.dumps(cfg)  # what RayService serveConfigV2 embeds must be plain JSON


def test_serve_config_with_url_has_only_the_agent_app():
    from runtime.agents.config import build_agent_serve_config

    spec = parse_spec({**BASE, "llm": {"url": "http://llm:8000/v1"}})
    assert [a["name"] for a in build_agent_serve_config(spec)["applications"]] == ["helper"]


def test_serve_app_builder_validates_args_first():
    from serve_apps.agent import build_agent_app

    with pytest.raises(SpecError, match="unknown argument"):
        build_agent_app({"spec": str(EXAMPLES / "agent.yaml"), "sepc": 1})
    with pytest.raises(SpecError, match="serves Agent specs"):
        build_agent_app({"spec": str(EXAMPLES / "serve.yaml")})
