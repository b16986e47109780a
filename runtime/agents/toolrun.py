"""Running tool calls: each attempt is bounded by a timeout, retries and a per-tool concurrency
limit, and runs where the tool's ``isolation`` says.

>>> runner = ToolRunner(tools, session_workers=2)                  # inside a session actor  # doctest: +SKIP
>>> await runner.call("calculator", {"expression": "1+1"})          # doctest: +SKIP
{'ok': True, 'result': '2', 'attempts': 1, ...}

- ``process`` (the default): a pooled process beside the session actor
  (``runtime.agents.toolproc``); a call is a pipe round trip (~0.1 ms) and a timed-out call is
  ended by SIGKILL of its process, so a hung or crashing tool never touches the session.
- ``thread``: a thread of the session actor (cheapest); a timed-out call can only be abandoned,
  so this is for trusted tools that cannot hang.
- ``ray_task``: a Ray task per attempt, cancelled with ``force=True`` on a timeout; the only
  choice that reserves ``num_cpus`` through Ray's scheduler, but submitting a task and awaiting
  it costs ~5 ms, which was most of the per-step overhead when every tool ran this way.

The session actor dispatches itself: routing every call through one shared limiter actor cost
an extra actor hop (~4 ms), so a tool's ``max_concurrency`` is split evenly over the session
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

from runtime.agents.toolproc import ToolError, ToolProcessPool
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
    """Tool calls from inside an async session actor (in its tool processes, threads or Ray tasks)."""

    def __init__(self, tools: list[Tool], session_workers: int = 1, mcp=None):
        self.tools = {t.name: t for t in tools}
        self._limits = {t.name: asyncio.Semaphore(max(1, math.ceil(t.max_concurrency / session_workers)))
                        for t in tools}
        self._remote = None  # the Ray task, made on first use (only ray_task tools need Ray here)
        self._fns: dict[str, Any] = {}  # thread tools, imported on first use
        self.procs = ToolProcessPool()
        self.mcp = mcp  # McpTools: calls to MCP servers run in this process (runtime.agents.mcptools)

    async def warm(self) -> bool:
        """Start what the first real tool call would otherwise wait for: a tool process (and a
        Ray task worker when a tool runs as a Ray task)."""
        kinds = {t.isolation for t in self.tools.values()}
        if "process" in kinds:
            await self.procs.warm()
        if "ray_task" in kinds:
            await self._task("runtime.agents.tools:calculator", {"expression": "1"}, {}, 0, 60)
        return True

    async def _task(self, import_path: str, arguments: dict, bound: dict, num_cpus: float, timeout_s: float,
                    name: str = "tool") -> tuple[Any, float]:
        import ray

        if self._remote is None:
            self._remote = ray.remote(_run_tool)
        ref = self._remote.options(num_cpus=num_cpus, max_retries=0, name=f"tool:{name}").remote(
            import_path, arguments, bound)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
        except TimeoutError:
            ray.cancel(ref, force=True)
            raise
        except Exception as e:  # noqa: BLE001 - the tool's own error wrapped by Ray, or its worker's death
            cause = getattr(e, "cause", None) or e
            raise ToolError(f"{type(cause).__name__}: {cause}".strip()[:500]) from None

    async def _thread(self, tool: Tool, arguments: dict, bound: dict) -> tuple[Any, float]:
        fn = self._fns.get(tool.name) or self._fns.setdefault(tool.name, import_function(tool.import_path))

        def run():
            t = time.perf_counter()
            return fn(**arguments, **bound), time.perf_counter() - t

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), tool.timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - the tool's own error, as data
            raise ToolError(f"{type(e).__name__}: {e}".strip()[:500]) from None

    async def _attempt(self, tool: Tool, arguments: dict, bound: dict) -> tuple[Any, float]:
        """One attempt: (result, the tool's own run seconds); raises TimeoutError or ToolError.
        ``bound``: the keywords the model never sees (``with_key``: the call's key included)."""
        if tool.isolation == "thread":
            return await self._thread(tool, arguments, bound)
        if tool.isolation == "ray_task":
            return await self._task(tool.import_path, arguments, bound, tool.num_cpus, tool.timeout_s, tool.name)
        return await self.procs.run(tool.import_path, arguments, bound, tool.timeout_s)

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
                try:
                    result, secs = await self._attempt(tool, arguments, bound)
                    tool_s += secs
                    return {"ok": True, "result": result, "attempts": attempt, "errors": errors,
                            "seconds": time.perf_counter() - t0, "tool_seconds": tool_s}
                except TimeoutError:
                    tool_s += tool.timeout_s
                    errors.append(f"timeout after {tool.timeout_s:g} s")
                except ToolError as e:
                    errors.append(str(e))
        return {"ok": False, "error": errors[-1], "attempts": tool.retries + 1, "errors": errors,
                "timed_out": errors[-1].startswith("timeout"), "seconds": time.perf_counter() - t0,
                "tool_seconds": tool_s}

    async def aclose(self) -> None:
        """End the tool processes (the session worker's ``close``)."""
        await self.procs.aclose()


class LocalToolRunner:
    """Runs tools in threads of this process (no Ray): for notebooks, unit tests and the
    overhead benchmark. Same result shape and limits as ``ToolRunner``; a timed-out thread
    cannot be killed, only abandoned, which is why sessions on Ray default to tool processes."""

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
