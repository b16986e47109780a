"""Running tool calls: each attempt is a Ray task, bounded by a timeout, retries and a
per-tool concurrency limit.

>>> runner = ToolRunner(tools, session_workers=2)                  # inside a session actor  # doctest: +SKIP
>>> await runner.call("calculator", {"expression": "1+1"})          # doctest: +SKIP
{'ok': True, 'result': '2', 'attempts': 1, ...}

The tool runs in its own task, so a hung or crashing tool can be cancelled (``force=True`` kills
its worker process) without touching the session. The session actor submits the task itself:
routing every call through one shared limiter actor cost an extra actor hop (~4 ms, most of
the per-step overhead budget), so a tool's ``max_concurrency`` is split evenly over the session
actors (``ceil(max_concurrency / session_workers)`` each). Failures come back as data, never as
exceptions: the orchestrator records them and shows them to the model. Tools from MCP servers
(``runtime.agents.mcptools``) are calls from this process to the server, with the same rules.
``idempotency_key`` (the loop's key of the call) reaches a Python tool that declares that
keyword, and an MCP server in the call's ``_meta``; every retry of a call carries the same key.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from runtime.agents.tools import KEY_ARGUMENT, Tool, import_function


def _run_tool(import_path: str, arguments: dict, bound: dict) -> tuple[Any, float]:
    fn = import_function(import_path)
    t0 = time.perf_counter()
    result = fn(**arguments, **bound)
    return result, time.perf_counter() - t0


def with_key(tool: Tool, idempotency_key: str | None) -> dict:
    """The keywords the model never sees, plus the call's key for a tool that takes one
    (the same key on every retry of the call)."""
    if idempotency_key and tool.takes_key:
        return {**tool.bound, KEY_ARGUMENT: idempotency_key}
    return tool.bound


class ToolRunner:
    """Tool calls as Ray tasks, from inside an async session actor."""

    def __init__(self, tools: list[Tool], session_workers: int = 1, mcp=None):
        import ray

        self._ray = ray
        self.tools = {t.name: t for t in tools}
        self._limits = {t.name: asyncio.Semaphore(max(1, math.ceil(t.max_concurrency / session_workers)))
                        for t in tools}
        self._remote = ray.remote(_run_tool)
        self.mcp = mcp  # McpTools: calls to MCP servers run in this process (runtime.agents.mcptools)

    async def warm(self) -> bool:
        """Start a task worker now, so the first real tool call does not pay for it."""
        await self._remote.options(num_cpus=0).remote("runtime.agents.tools:calculator", {"expression": "1"}, {})
        return True

    async def call(self, name: str, arguments: dict, idempotency_key: str | None = None) -> dict[str, Any]:
        if name not in self.tools and self.mcp is not None:
            return await self.mcp.call(name, arguments, idempotency_key)
        tool = self.tools[name]
        bound = with_key(tool, idempotency_key)
        errors: list[str] = []
        t0 = time.perf_counter()
        tool_s = 0.0
        for attempt in range(1, tool.retries + 2):
            async with self._limits[name]:
                ref = self._remote.options(num_cpus=tool.num_cpus, max_retries=0, name=f"tool:{name}").remote(
                    tool.import_path, arguments, bound
                )
                try:
                    result, secs = await asyncio.wait_for(asyncio.wrap_future(ref.future()), tool.timeout_s)
                    tool_s += secs
                    return {"ok": True, "result": result, "attempts": attempt, "errors": errors,
                            "seconds": time.perf_counter() - t0, "tool_seconds": tool_s}
                except TimeoutError:
                    self._ray.cancel(ref, force=True)
                    tool_s += tool.timeout_s
                    errors.append(f"timeout after {tool.timeout_s:g} s")
                except Exception as e:  # the tool's own error, wrapped by Ray
                    cause = getattr(e, "cause", None) or e
                    errors.append(f"{type(cause).__name__}: {cause}".strip()[:500])
        return {"ok": False, "error": errors[-1], "attempts": tool.retries + 1, "errors": errors,
                "timed_out": errors[-1].startswith("timeout"), "seconds": time.perf_counter() - t0,
                "tool_seconds": tool_s}


class LocalToolRunner:
    """Runs tools in threads of this process (no Ray): for notebooks, unit tests and the
    overhead benchmark. Same result shape and limits as ``ToolRunner``; a timed-out thread
    cannot be killed, only abandoned, which is why sessions on Ray use tasks instead."""

    def __init__(self, tools: list[Tool], mcp=None):
        self.tools = {t.name: t for t in tools}
        self._fns = {t.name: import_function(t.import_path) for t in tools}
        self._limits = {t.name: asyncio.Semaphore(t.max_concurrency) for t in tools}
        self.mcp = mcp

    async def call(self, name: str, arguments: dict, idempotency_key: str | None = None) -> dict[str, Any]:
        if name not in self.tools and self.mcp is not None:
            return await self.mcp.call(name, arguments, idempotency_key)
        tool, fn = self.tools[name], self._fns[name]
        bound = with_key(tool, idempotency_key)
        errors: list[str] = []
        t0 = time.perf_counter()
        tool_s = 0.0
        for attempt in range(1, tool.retries + 2):
            async with self._limits[name]:
                s = time.perf_counter()
                try:
                    result = await asyncio.wait_for(asyncio.to_thread(fn, **arguments, **bound), tool.timeout_s)
                    tool_s += time.perf_counter() - s
                    return {"ok": True, "result": result, "attempts": attempt, "errors": errors,
                            "seconds": time.perf_counter() - t0, "tool_seconds": tool_s}
                except TimeoutError:
                    tool_s += time.perf_counter() - s
                    errors.append(f"timeout after {tool.timeout_s:g} s")
                except Exception as e:
                    tool_s += time.perf_counter() - s
                    errors.append(f"{type(e).__name__}: {e}"[:500])
        return {"ok": False, "error": errors[-1], "attempts": tool.retries + 1, "errors": errors,
                "timed_out": errors[-1].startswith("timeout"), "seconds": time.perf_counter() - t0,
                "tool_seconds": tool_s}
