"""Tools served by MCP servers (the spec's ``mcp_servers:``), called with the official ``mcp`` client.

>>> mcp = McpTools([spec.model_dump() for spec in agent_spec.mcp_servers], session_workers=2)  # doctest: +SKIP
>>> tools = await mcp.start()            # connect, list, check allow_tools -> raylane Tools     # doctest: +SKIP
>>> await mcp.call("files__read", {"path": "README.md"})                                     # doctest: +SKIP
{'ok': True, 'result': '...', 'attempts': 1, ...}

Each session worker holds its own connections (nothing lives in the driver, so the workers may
sit on any node): a ``stdio`` server is started beside the worker on its first use and kept for
every later call; an ``http`` server gets one streamable HTTP session per worker. A connection
is owned by one background task (the SDK's anyio scopes must be entered and left in the same
task) and ``close()`` ends it: the stdio server's stdin closes and it exits, also when the
worker process dies.

Calls keep the rules of Python tools (``runtime.agents.toolrun``): a timeout per attempt (the
SDK then sends ``notifications/cancelled``, so the server stops the handler), retries after an
error result, a timeout or a broken connection (reconnecting, which restarts a crashed stdio
server), and ``max_concurrency`` split evenly over the session workers. Failures come back as
data. The server's JSON schemas become the tools' argument schemas, so guided decoding only
lets the model emit arguments the server declared (``additionalProperties: false`` is added
where the server left it open). Which tools have side effects: the spec's ``side_effects`` list,
else every tool the server does not annotate ``readOnlyHint: true`` (the MCP default assumes a
tool may write; annotations are hints, so a spec that trusts a server less lists them itself).

The ``mcp`` package is imported only when a worker connects.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from typing import Any

from runtime.agents.tools import Tool
from runtime.errors import RaylaneError
from runtime.specs.agent import mcp_tool_name

KEY_META = "idempotency_key"  # the key of a call in its request's _meta (servers deduplicate by it)
MAX_DESCRIPTION_CHARS = 300  # a server's description lands in the system prompt: keep it short


def tool_schema(input_schema: Any, where: str) -> dict[str, Any]:
    """An MCP ``inputSchema`` as a raylane argument schema (what guided decoding uses).

    >>> tool_schema({"type": "object", "title": "addArguments", "properties": {"a": {"type": "integer"}}}, "t")
    {'type': 'object', 'properties': {'a': {'type': 'integer'}}, 'additionalProperties': False}
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(input_schema, dict) or input_schema.get("type") != "object":
        raise RaylaneError(f"{where}: the server's inputSchema is not a JSON object schema (type: object)")
    schema = {k: v for k, v in input_schema.items() if k not in ("$schema", "title")}
    schema.setdefault("properties", {})
    schema.setdefault("additionalProperties", False)  # the model may send only the declared arguments
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise RaylaneError(f"{where}: the server's inputSchema is not a valid JSON schema: {e.message}") from None
    return schema


def result_text(result: Any) -> str:
    """The text of a ``CallToolResult`` as the model sees it: its text blocks, else its
    structured content; other blocks (images, audio, resources) by type only."""
    parts = []
    for block in result.content:
        kind = getattr(block, "type", "?")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource" and getattr(getattr(block, "resource", None), "text", None) is not None:
            parts.append(block.resource.text)
        else:
            parts.append(f"[{kind} content: {getattr(block, 'mime_type', None) or 'not shown'}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, default=str))
    return "\n".join(parts)


def _env(server: dict, names: list[str], where: str) -> dict[str, str]:
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RaylaneError(f"{where}: environment variable(s) {', '.join(missing)} are not set on this session "
                           "worker (set them where the workers run: a secret on KubeRay, the shell of `raylane run`)")
    return {n: os.environ[n] for n in names}


class McpConnection:
    """One client session with one MCP server, owned by a background task."""

    def __init__(self, server: dict, where: str):
        self.server = server
        self.where = where
        self._client = None
        self._task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self._client is not None and self._task is not None and not self._task.done()

    def _transport(self):
        from mcp import StdioServerParameters
        from mcp.client.streamable_http import streamable_http_client

        s = self.server
        if s["transport"] == "stdio":
            env = {**s.get("env", {}), **_env(s, s.get("pass_env", []), self.where)}
            return StdioServerParameters(command=s["command"], args=s.get("args", []), env=env, cwd=s.get("cwd")), None
        import httpx2

        secrets = _env(s, list(s.get("headers_env", {}).values()), self.where)
        headers = {h: secrets[n] for h, n in s.get("headers_env", {}).items()}
        http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(s["connect_timeout_s"], read=300))
        return streamable_http_client(s["url"], http_client=http), http

    async def _own(self, ready: asyncio.Future) -> None:
        from contextlib import AsyncExitStack

        from mcp import Client

        try:
            async with AsyncExitStack() as stack:
                target, http = self._transport()
                if http is not None:
                    await stack.enter_async_context(http)
                client = await stack.enter_async_context(Client(target, cache=None))
                tools, cursor = [], None
                while True:  # every page of the listing
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self._client = client
                ready.set_result(tools)
                await self._stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._client = None

    async def connect(self) -> list:
        """(Re)start the server or connection; returns the server's tool listing."""
        async with self._lock:
            await self._close()
            ready: asyncio.Future = asyncio.get_running_loop().create_future()
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._own(ready), name=f"mcp:{self.server['name']}")
            what = (f"start `{self.server.get('command')}`" if self.server["transport"] == "stdio"
                    else f"connect to {self.server.get('url')}")
            try:
                return await asyncio.wait_for(asyncio.shield(ready), self.server["connect_timeout_s"])
            except TimeoutError:
                await self._close()
                raise RaylaneError(f"{self.where}: could not {what} and list its tools within "
                                   f"{self.server['connect_timeout_s']:g} s (connect_timeout_s)") from None
            except RaylaneError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to start is the user's to fix
                await self._close()
                raise RaylaneError(f"{self.where}: could not {what}: {_describe(e)}") from None

    async def call(self, name: str, arguments: dict, timeout_s: float, meta: dict | None = None):
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED

        if not self.alive:
            await self.connect()
        try:
            return await asyncio.wait_for(self._client.call_tool(name, arguments, meta=meta), timeout_s)
        except TimeoutError:
            raise
        except Exception as e:
            if not isinstance(e, MCPError) or e.error.code == CONNECTION_CLOSED:
                await self.close()  # the server died or the connection broke: the next call reconnects
            raise

    async def _close(self) -> None:
        if self._task is not None and not self._task.done():
            self._stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except Exception:  # noqa: BLE001 - a server that will not stop is cancelled below
                self._task.cancel()
        self._task = None
        self._client = None

    async def close(self) -> None:
        async with self._lock:
            await self._close()


def _describe(e: BaseException) -> str:
    # anyio wraps transport failures in exception groups: show the innermost cause.
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}".strip()[:500]


class McpTools:
    """The spec's MCP servers from inside one session worker: tools, calls, connections."""

    def __init__(self, servers: list[dict], session_workers: int = 1):
        self.servers = {s["name"]: s for s in servers}
        self._conns = {s["name"]: McpConnection(s, f"mcp_servers[{i}] ({s['name']})") for i, s in enumerate(servers)}
        self._limits = {s["name"]: asyncio.Semaphore(max(1, math.ceil(s["max_concurrency"] / session_workers)))
                        for s in servers}
        self.tools: dict[str, Tool] = {}

    async def start(self) -> list[Tool]:
        """Connect to every server, check its allow-list and build the tools (raises
        ``RaylaneError`` naming the server and what it offers)."""
        tools = []
        for name, conn in self._conns.items():
            tools.extend(self._tools(self.servers[name], conn.where, await conn.connect()))
        self.tools = {t.name: t for t in tools}
        return tools

    @staticmethod
    def _tools(server: dict, where: str, listing: list) -> list[Tool]:
        offered = {t.name: t for t in listing}
        missing = [t for t in server["allow_tools"] if t not in offered]
        if missing:
            raise RaylaneError(f"{where}.allow_tools: the server does not offer {', '.join(missing)}; it offers: "
                               f"{', '.join(sorted(offered)) or 'no tools'}")
        tools = []
        for remote in server["allow_tools"]:
            t = offered[remote]
            if server.get("side_effects") is not None:
                side_effects = remote in server["side_effects"]
            else:
                side_effects = not (t.annotations is not None and t.annotations.read_only_hint is True)
            desc = (t.description or t.title or remote).strip().splitlines()[0][:MAX_DESCRIPTION_CHARS]
            tools.append(Tool(
                mcp_tool_name(server["name"], remote), f"mcp://{server['name']}/{remote}", desc,
                tool_schema(t.input_schema, f"{where} tool {remote}"), server["timeout_s"], server["retries"],
                server["max_concurrency"], 0.0, side_effects=side_effects, mcp_server=server["name"], mcp_tool=remote,
                requires_approval=remote in server.get("requires_approval", ()),
                idempotent=remote in server.get("idempotent", ()), takes_key=True,
            ))
        return tools

    async def call(self, name: str, arguments: dict, idempotency_key: str | None = None) -> dict[str, Any]:
        """One tool call with the tool's timeout and retries; the same result shape as
        ``ToolRunner.call`` (failures as data). The key travels in the request's ``_meta``
        (``{"idempotency_key": KEY}``), the same on every attempt."""
        tool = self.tools[name]
        meta = {KEY_META: idempotency_key} if idempotency_key else None
        conn = self._conns[tool.mcp_server]
        errors: list[str] = []
        t0 = time.perf_counter()
        tool_s = 0.0
        for attempt in range(1, tool.retries + 2):
            async with self._limits[tool.mcp_server]:
                s = time.perf_counter()
                try:
                    result = await conn.call(tool.mcp_tool, arguments, tool.timeout_s, meta)
                except TimeoutError:
                    errors.append(f"timeout after {tool.timeout_s:g} s")
                    continue
                except Exception as e:  # noqa: BLE001 - a protocol error or a broken connection (the next
                    # attempt reconnects: conn.call restarts a dead stdio server)
                    errors.append(str(e)[:500] if isinstance(e, RaylaneError) else _describe(e))
                    continue
                finally:
                    tool_s += time.perf_counter() - s
                text = result_text(result)
                if result.is_error:
                    errors.append(f"error result: {text}"[:500])
                    continue
                return {"ok": True, "result": text, "attempts": attempt, "errors": errors,
                        "seconds": time.perf_counter() - t0, "tool_seconds": tool_s}
        return {"ok": False, "error": errors[-1], "attempts": tool.retries + 1, "errors": errors,
                "timed_out": errors[-1].startswith("timeout"), "seconds": time.perf_counter() - t0,
                "tool_seconds": tool_s}

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
