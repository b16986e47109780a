"""Tool dispatch without Ray: the session worker's tool processes (killed on a timeout) and
threads, with the runner's timeout, retry, concurrency and failure-as-data rules."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from runtime.agents.toolrun import ToolRunner
from runtime.agents.tools import Tool
from runtime.errors import SpecError
from runtime.specs import parse_spec

M = "tests.agent.tool_fixtures"


def _tool(name, fn, isolation="process", timeout_s=5.0, retries=0, max_concurrency=4):
    return Tool(name, f"{M}:{fn}", name, {"type": "object"}, timeout_s=timeout_s, retries=retries,
                max_concurrency=max_concurrency, isolation=isolation)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


def test_process_tool_runs_beside_the_worker_and_reuses_its_process():
    async def go():
        r = ToolRunner([_tool("pid", "pid"), _tool("chatty", "chatty")])
        await r.warm()
        a, b = await r.call("pid", {}), await r.call("pid", {})
        c = await r.call("chatty", {"text": "hi"})
        await r.aclose()
        return a, b, c, r.procs.started

    a, b, c, started = asyncio.run(go())
    assert a["ok"] and a["result"] != os.getpid() and a["result"] == b["result"]
    assert c == {**c, "ok": True, "result": "HI"}  # its print went to stderr, not into the pipe
    assert started == 1
    assert 0 <= a["tool_seconds"] <= a["seconds"]


def test_hung_process_tool_is_killed_on_timeout_and_retried_in_a_fresh_process():
    async def go():
        r = ToolRunner([_tool("pid", "pid"), _tool("sleep", "sleep", timeout_s=0.5, retries=1)])
        first = (await r.call("pid", {}))["result"]
        t = time.perf_counter()
        out = await r.call("sleep", {"seconds": 30})
        took = time.perf_counter() - t
        await asyncio.sleep(0.2)
        after = (await r.call("pid", {}))["result"]
        await r.aclose()
        return first, out, took, after, r.procs.started

    first, out, took, after, started = asyncio.run(go())
    assert out["ok"] is False and out["timed_out"] and out["attempts"] == 2
    assert out["errors"] == ["timeout after 0.5 s"] * 2 and out["tool_seconds"] == pytest.approx(1.0)
    assert took < 5  # two 0.5 s attempts, not 30 s
    assert after != first and not _alive(first)  # pid's process ran the first attempt and was killed
    assert started == 3  # then one fresh process per attempt; the last one serves pid again


def test_tool_errors_crashes_and_bad_results_come_back_as_data():
    async def go():
        r = ToolRunner([_tool("boom", "boom", retries=1), _tool("crash", "crash"), _tool("bad", "unpicklable"),
                        _tool("pid", "pid")])
        outs = [await r.call("boom", {"text": "luck"}), await r.call("crash", {}), await r.call("bad", {}),
                await r.call("pid", {})]
        await r.aclose()
        return outs

    boom, crash, bad, ok = asyncio.run(go())
    assert boom["ok"] is False and boom["attempts"] == 2 and boom["errors"] == ["ValueError: no luck"] * 2
    assert crash["ok"] is False and "exited with code 3" in crash["error"] and not crash["timed_out"]
    assert bad["ok"] is False and "cannot be pickled" in bad["error"]
    assert ok["ok"]  # the pool recovers after a crash


def test_thread_tool_runs_in_the_worker_and_times_out():
    async def go():
        r = ToolRunner([_tool("pid", "pid", isolation="thread"), _tool("sleep", "sleep", isolation="thread",
                                                                         timeout_s=0.2)])
        outs = await r.call("pid", {}), await r.call("sleep", {"seconds": 1}), r.procs.started
        await r.aclose()
        return outs

    pid, slow, started = asyncio.run(go())
    assert pid["result"] == os.getpid() and started == 0
    assert slow["ok"] is False and slow["timed_out"]


def test_concurrency_limit_is_split_over_session_workers():
    async def go():
        r = ToolRunner([_tool("sleep", "sleep", max_concurrency=4)], session_workers=2)  # 2 at once here
        t = time.perf_counter()
        outs = await asyncio.gather(*[r.call("sleep", {"seconds": 0.4}) for _ in range(4)])
        took = time.perf_counter() - t
        await r.aclose()
        return outs, took, r.procs.started

    outs, took, started = asyncio.run(go())
    assert all(o["ok"] for o in outs)
    assert 0.75 < took < 3 and started == 2  # two rounds of two, in two processes


def test_isolation_defaults_and_num_cpus_needs_a_ray_task():
    def tools(**kw):
        return parse_spec({"kind": "Agent", "name": "a", "tools": [
            {"name": "t", "import_path": "runtime.agents.tools:calculator", **kw}]}).tools[0]

    assert tools().isolation == "process"
    assert tools(num_cpus=1).isolation == "ray_task"
    assert tools(isolation="thread").isolation == "thread"
    with pytest.raises(SpecError, match=r"tools\[0\].*isolation: ray_task, or num_cpus: 0"):
        tools(num_cpus=1, isolation="process")
