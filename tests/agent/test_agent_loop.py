"""The agent loop on a real vLLM server (tiny model, guided JSON), in this process: a full
session with its trace, every budget, the malformed-call path, and the Redis store."""

from __future__ import annotations

import asyncio

import pytest

from runtime.agents.llm import OpenAIClient
from runtime.agents.loop import AgentConfig, AgentLoop, new_session
from runtime.agents.store import RedisStore, SQLiteStore
from runtime.agents.toolrun import LocalToolRunner
from runtime.agents.tools import load_tools
from runtime.specs import parse_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CALC = {"name": "calculator", "import_path": "runtime.agents.tools:calculator"}
BROKEN = {"name": "inventory", "import_path": "examples.tools:inventory", "retries": 1}


@pytest.fixture(scope="module")
def spans():
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def make_loop(vllm_url, tmp_path, store=None, **spec_patch):
    spec = parse_spec({"kind": "Agent", "name": "t", "auth": "none",
                       "llm": {"url": vllm_url, "tool_choice": "required", "max_tool_rounds": 2,
                               **spec_patch.pop("llm", {})},
                       "tools": spec_patch.pop("tools", [CALC]), **spec_patch})
    tools = load_tools(spec.tools)
    cfg = AgentConfig.from_spec(spec, tools)
    store = store or SQLiteStore(tmp_path / "sessions.db")
    return AgentLoop(cfg, OpenAIClient(vllm_url), LocalToolRunner(tools).call, store), cfg, store


_LOOP = asyncio.new_event_loop()  # one loop: the HTTP client's connections belong to it


def run(coro):
    return _LOOP.run_until_complete(coro)


def test_session_completes_with_a_full_trace(vllm_url, tmp_path, spans):
    spans.clear()
    loop, cfg, store = make_loop(vllm_url, tmp_path)
    session = new_session("full", cfg)
    reply = run(loop.send(session, "What is 12 * 7?"))
    assert reply["status"] == "active" and isinstance(reply["reply"], str) and reply["reply"]
    actions = [s["action"] for s in reply["steps"]]
    assert actions == ["tool", "tool", "answer"]  # required first call, 2 rounds, then answer only
    for step in reply["steps"]:
        assert step["llm"]["guided"] and step["llm"]["tokens_out"] > 0 and step["seconds"] > 0
    call = reply["steps"][0]["tool"]
    assert call["ok"] and call["result"] == loop.run_tool.__self__._fns["calculator"](**call["arguments"])
    saved = store.load("full")
    assert saved["steps"] == reply["steps"] and saved["usage"]["steps"] == 3
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]

    finished = spans.get_finished_spans()
    steps = [s for s in finished if s.name == "agent.step"]
    assert len(steps) == 3
    assert {f"{s.context.span_id:016x}" for s in steps} == {s["span_id"] for s in reply["steps"]}
    llm = [s for s in finished if s.name == "agent.llm"]
    assert all(s.attributes["llm.tokens_in"] > 0 and s.attributes["llm.latency_s"] > 0 for s in llm)
    tools = [s for s in finished if s.name == "agent.tool"]
    assert len(tools) == 2 and all(s.attributes["tool.success"] is True for s in tools)
    assert all(t.parent.span_id in {s.context.span_id for s in steps} for t in tools + llm)

    second = run(loop.send(session, "And plus one?"))
    assert second["turn"] == 2 and store.load("full")["usage"]["steps"] == 6


@pytest.mark.parametrize("budgets, reason", [
    ({"max_steps": 3}, "max_steps"),
    ({"max_tokens": 600}, "max_tokens"),
    ({"max_wall_s": 0.3}, "max_wall_s"),
])
def test_each_budget_ends_the_session(vllm_url, tmp_path, budgets, reason):
    loop, cfg, store = make_loop(vllm_url, tmp_path, llm={"max_tool_rounds": 100}, budgets=budgets)
    session = new_session(f"b-{reason}", cfg)
    reply = run(loop.send(session, "Keep calculating."))
    assert reply["status"] == "ended" and reply["end_reason"] == reason and reply["reply"] is None
    saved = store.load(session["id"])
    assert saved["status"] == "ended" and saved["end_reason"] == reason
    assert saved["errors"][f"budget:{reason}"] == 1
    u = saved["usage"]
    if reason == "max_steps":
        assert u["steps"] == 3
    elif reason == "max_tokens":
        assert u["tokens"] >= 600
    else:
        assert u["wall_s"] >= 0.3
    again = run(loop.send(saved, "hello?"))  # an ended session takes no more work
    assert again["status"] == "ended" and again["steps"] == [] and store.load(session["id"])["usage"] == u


def test_tool_failures_are_recorded_fed_back_and_budgeted(vllm_url, tmp_path):
    loop, cfg, store = make_loop(vllm_url, tmp_path, tools=[BROKEN], llm={"max_tool_rounds": 100},
                                 budgets={"max_tool_failures": 1})
    reply = run(loop.send(new_session("fail", cfg), "How many apples?"))
    assert reply["end_reason"] == "max_tool_failures"
    failed = [s["tool"] for s in reply["steps"]]
    assert len(failed) == 2 and all(not t["ok"] and t["attempts"] == 2 for t in failed)
    assert "ConnectionError: inventory backend unreachable" in failed[0]["error"]
    saved = store.load("fail")
    assert saved["errors"]["tool_error:inventory"] == 2
    observations = [m["content"] for m in saved["messages"] if m["role"] == "tool"]
    assert observations and "failed after 2 attempt(s)" in observations[0]


def test_malformed_calls_are_failed_steps_fed_back_within_a_bound(vllm_url, tmp_path):
    # Without guided JSON the random model writes free text: every reply is a malformed call.
    loop, cfg, store = make_loop(vllm_url, tmp_path, llm={"guided_json": False, "max_tokens": 32},
                                 budgets={"max_invalid_calls": 2})
    reply = run(loop.send(new_session("bad", cfg), "What is 1+1?"))
    assert [s["action"] for s in reply["steps"]] == ["invalid"] * 3
    assert reply["end_reason"] == "max_invalid_calls"
    assert all(not s["llm"]["guided"] and s["error"] and s["raw"] is not None for s in reply["steps"])
    saved = store.load("bad")
    feedback = [m for m in saved["messages"] if m["role"] == "feedback"]
    assert len(feedback) == 3 and feedback[0]["content"].startswith("Invalid reply:")
    assert saved["errors"]["invalid_call"] == 3
    # The feedback reaches the model: the second prompt carries the first problem.
    assert "Invalid reply:" in loop.prompt(saved)[3]["content"]


def test_redis_store_persists_after_every_step(vllm_url, tmp_path, redis_url):
    loop, cfg, _ = make_loop(vllm_url, tmp_path, store=RedisStore(redis_url, prefix="t:loop"))
    reader = RedisStore(redis_url, prefix="t:loop")  # another client, as a restarted actor would be

    async def go():
        seen = []
        async for event in loop.turn(new_session("r1", cfg), "What is 3 + 4?"):
            if event["type"] == "step":
                seen.append(len(reader.load("r1")["steps"]))
        return seen, event

    seen, reply = run(go())
    assert seen == list(range(1, len(seen) + 1)) and len(seen) == 3
    assert reader.load("r1")["steps"] == reply["steps"] and reader.list_ids() == ["r1"]


def test_session_calls_an_mcp_tool_over_stdio_with_guided_arguments(vllm_url, tmp_path, spans):
    """The server's own schema guides the call (maxLength 24 on the text), the stdio server runs
    beside this process, the result comes back fenced and the span names the server."""
    import sys
    from pathlib import Path

    from runtime.agents.mcptools import McpTools

    spans.clear()
    server = {"name": "mcp", "transport": "stdio", "command": sys.executable,
              "args": [str(Path(__file__).with_name("mcp_server.py"))], "allow_tools": ["upper"]}
    spec = parse_spec({"kind": "Agent", "name": "t", "auth": "none", "mcp_servers": [server],
                       "llm": {"url": vllm_url, "tool_choice": "required", "max_tool_rounds": 2}})
    mcp = McpTools([s.model_dump() for s in spec.mcp_servers])
    tools = run(mcp.start())
    cfg = AgentConfig.from_spec(spec, tools)
    store = SQLiteStore(tmp_path / "sessions.db")
    loop = AgentLoop(cfg, OpenAIClient(vllm_url), LocalToolRunner([], mcp=mcp).call, store)
    try:
        reply = run(loop.send(new_session("mcp", cfg), "Shout hello."))
    finally:
        run(mcp.close())
    assert [s["action"] for s in reply["steps"]] == ["tool", "tool", "answer"]
    for step in reply["steps"][:2]:
        call = step["tool"]
        assert step["llm"]["guided"] and call["name"] == "mcp__upper" and call["ok"], step
        assert len(call["arguments"]["text"]) <= 24 and call["result"] == call["arguments"]["text"].upper()
    fenced = [m["content"] for m in loop.prompt(store.load("mcp")) if m["content"].startswith("<<<untrusted data")]
    assert len(fenced) == 2 and fenced[0].startswith("<<<untrusted data (output of tool mcp__upper) id ")
    tool_spans = [s for s in spans.get_finished_spans() if s.name == "agent.tool"]
    assert len(tool_spans) == 2 and all(s.attributes["tool.mcp_server"] == "mcp" for s in tool_spans)
    assert all(s.attributes["tool.success"] is True for s in tool_spans)


def _engine_tokens(vllm_url: str) -> float:
    import re

    import httpx

    text = httpx.get(vllm_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        r"^vllm:(?:prompt|generation)_tokens_total\{[^}]*\} (\S+)$", text, re.M))


def test_planner_predicts_the_llm_load_of_sessions_arriving_at_a_known_rate(vllm_url, tmp_path):
    """Issue 18 item 5: the agent plan's LLM tokens/s within 25 % of what the engine counted,
    with the calculator in the session worker's tool processes (runtime.agents.toolproc)."""
    import random
    import statistics
    import time

    from runtime.agents.toolrun import ToolRunner
    from runtime.planning_agents import plan_agent

    loop, cfg, store = make_loop(vllm_url, tmp_path, llm={"max_tool_rounds": 1})
    runner = ToolRunner(cfg.tools)
    loop.run_tool = runner.call
    rng = random.Random(1)

    def ask(i):
        return loop.send(new_session(f"s{i}", cfg), f"What is {rng.randint(2, 999)} * {rng.randint(2, 99)}?")

    # The profile, from a few sessions one at a time (what an operator measures first).
    calib = [run(ask(i))["steps"] for i in range(4)]
    assert all(s[0]["action"] == "tool" and s[0]["tool"]["ok"] for s in calib)
    profile = {"sessions_per_s": 4.0, "steps_per_session": statistics.mean(len(s) for s in calib),
               "tool_calls_per_session": 1, "prompt_tokens": statistics.mean(s[0]["llm"]["tokens_in"] for s in calib),
               "output_tokens": statistics.mean(st["llm"]["tokens_out"] for s in calib for st in s),
               "tool_result_tokens": statistics.mean(s[1]["llm"]["tokens_in"] - s[0]["llm"]["tokens_in"]
                                                     - s[0]["llm"]["tokens_out"] for s in calib)}
    planned = plan_agent(profile).llm_tokens_per_s

    async def load(rate=4.0, seconds=6.0, warm=1.5):
        marks = {}

        async def mark(name, at):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            marks[name] = (time.perf_counter(), await asyncio.to_thread(_engine_tokens, vllm_url))

        t0 = time.perf_counter()
        markers = [asyncio.ensure_future(mark("a", t0 + warm)), asyncio.ensure_future(mark("b", t0 + seconds))]
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(ask(100 + i)))
        replies = await asyncio.gather(*tasks, *markers)
        (ta, ka), (tb, kb) = marks["a"], marks["b"]
        return replies[:len(tasks)], (kb - ka) / (tb - ta)

    replies, measured = run(load())
    run(runner.aclose())
    assert all(r["reply"] is not None for r in replies)
    assert 1 <= runner.procs.started <= 4 < len(replies)  # tool processes reused, at most max_concurrency
    assert measured == pytest.approx(planned, rel=0.25), (planned, measured, profile)
