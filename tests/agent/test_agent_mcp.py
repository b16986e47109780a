"""MCP tools against a real MCP server (tests/agent/mcp_server.py, written with the ``mcp``
package) over both transports: stdio (started by the client, as a session worker does) and
streamable HTTP (started here on a free port, behind a bearer check): the listing and the
allow-list, schema conversion, calls through raylane's tool runner with timeout, retry,
concurrency and reconnect, error results, secrets from the environment, and the spec's checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from runtime.agents.mcptools import McpTools, tool_schema
from runtime.agents.toolrun import LocalToolRunner
from runtime.errors import RaylaneError
from runtime.specs import parse_spec
from tests.agent.conftest import _stop, free_port

pytestmark = pytest.mark.timeout(120)

SERVER = Path(__file__).with_name("mcp_server.py")
TOKEN = "Bearer mcp-test-token"
ALLOWED = ["add", "slow", "fail", "note", "pid", "crash"]


def server_spec(transport: str, url: str | None = None, **patch) -> dict:
    """A validated ``mcp_servers`` entry, as the worker receives it (plain data)."""
    if transport == "stdio":
        entry = {"name": "local", "transport": "stdio", "command": sys.executable, "args": [str(SERVER)]}
    else:
        entry = {"name": "remote", "transport": "http", "url": url, "headers_env": {"Authorization": "MCP_TEST_AUTH"}}
    entry = {**entry, "allow_tools": ALLOWED, "timeout_s": 0.5, "retries": 1, **patch}
    spec = parse_spec({"kind": "Agent", "name": "m", "auth": "none", "mcp_servers": [entry]})
    return spec.mcp_servers[0].model_dump()


@pytest.fixture(scope="module")
def http_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port), "--require-header",
                             f"Authorization={TOKEN}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, "the MCP HTTP server exited"
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the MCP HTTP server did not listen within 60 s"
                time.sleep(0.2)
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def server(request, http_url, monkeypatch):
    """``server_spec`` for the transport the test is parametrized with."""
    monkeypatch.setenv("MCP_TEST_AUTH", TOKEN)
    return lambda **patch: server_spec(request.param, http_url, **patch)


BOTH = pytest.mark.parametrize("server", ["stdio", "http"], indirect=True)


def run(coro):
    return asyncio.run(coro)


@BOTH
def test_listing_keeps_only_allowed_tools_with_the_servers_schemas(server):
    async def go():
        mcp = McpTools([server(allow_tools=["add", "note", "upper"])])
        try:
            return await mcp.start()
        finally:
            await mcp.close()

    tools = {t.name: t for t in run(go())}
    prefix = tools["local__add" if "local__add" in tools else "remote__add"].mcp_server
    assert set(tools) == {f"{prefix}__add", f"{prefix}__note", f"{prefix}__upper"}  # secret, pid, ... not offered
    add = tools[f"{prefix}__add"]
    assert add.mcp_tool == "add" and add.description == "Add two integers."
    assert add.parameters == {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                              "properties": {"a": {"title": "A", "type": "integer"},
                                             "b": {"title": "B", "type": "integer"}}}
    assert tools[f"{prefix}__upper"].parameters["properties"]["text"]["maxLength"] == 24
    # No readOnlyHint on note: a side effect (runs only in sessions allowing it); add is read-only.
    assert tools[f"{prefix}__note"].side_effects is True and add.side_effects is False


@BOTH
def test_calls_through_the_tool_runner_with_timeout_retry_and_error_results(server):
    async def go():
        mcp = McpTools([server()])
        tools = await mcp.start()
        runner = LocalToolRunner([], mcp=mcp)
        p = tools[0].mcp_server
        try:
            ok = await runner.call(f"{p}__add", {"a": 2, "b": 40})
            t0 = time.monotonic()
            slow = await runner.call(f"{p}__slow", {"seconds": 30})
            slow_s = time.monotonic() - t0
            after = await runner.call(f"{p}__slow", {"seconds": 0})  # the connection outlives a timeout
            failed = await runner.call(f"{p}__fail", {"message": "boom"})
            return ok, slow, slow_s, after, failed
        finally:
            await mcp.close()

    ok, slow, slow_s, after, failed = run(go())
    assert ok["ok"] and ok["result"] == "42" and ok["attempts"] == 1 and ok["tool_seconds"] > 0
    assert not slow["ok"] and slow["timed_out"] and slow["attempts"] == 2
    assert slow["errors"] == ["timeout after 0.5 s"] * 2 and 1.0 <= slow_s < 5  # two 0.5 s attempts, not 30 s
    assert after["ok"] and after["result"] == "slept 0 s"
    assert not failed["ok"] and not failed["timed_out"] and failed["attempts"] == 2
    assert "fail tool: boom" in failed["error"] and failed["error"].startswith("error result:")


@BOTH
def test_the_calls_idempotency_key_reaches_the_server_in_meta(server):
    async def go():
        mcp = McpTools([server(allow_tools=["key"])])
        await mcp.start()
        runner = LocalToolRunner([], mcp=mcp)
        name = f"{next(iter(mcp.servers))}__key"
        try:
            return await runner.call(name, {}, idempotency_key="k-123"), await runner.call(name, {})
        finally:
            await mcp.close()

    keyed, plain = run(go())
    assert keyed["ok"] and keyed["result"] == "k-123"
    assert plain["ok"] and plain["result"] == "none"


@BOTH
def test_max_concurrency_is_split_over_the_session_workers(server):
    async def go(workers):
        mcp = McpTools([server(max_concurrency=2, timeout_s=5)], session_workers=workers)
        tools = await mcp.start()
        name = f"{tools[0].mcp_server}__slow"
        try:
            t0 = time.monotonic()
            outs = await asyncio.gather(*(mcp.call(name, {"seconds": 0.4}) for _ in range(2)))
            return time.monotonic() - t0, outs
        finally:
            await mcp.close()

    together, outs = run(go(1))  # 2 slots in this worker: both at once
    assert all(o["ok"] for o in outs) and together < 0.75
    serial, outs = run(go(2))  # 2 slots over 2 workers: 1 here, so one after the other
    assert all(o["ok"] for o in outs) and serial >= 0.8


def test_a_crashed_stdio_server_is_restarted_and_closed_on_shutdown():
    async def go():
        mcp = McpTools([server_spec("stdio", retries=0)])
        await mcp.start()
        before = int((await mcp.call("local__pid", {}))["result"])
        crashed = await mcp.call("local__crash", {})
        after = int((await mcp.call("local__pid", {}))["result"])
        await mcp.close()
        return before, crashed, after

    before, crashed, after = run(go())
    assert not crashed["ok"] and "Connection closed" in crashed["error"]
    assert after != before  # the next call started a new server
    for pid in (before, after):
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, f"stdio MCP server {pid} still runs after close()"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the SDK) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@BOTH
def test_a_tool_the_server_does_not_offer_fails_the_start_naming_server_and_tools(server):
    async def go():
        mcp = McpTools([server(allow_tools=["add", "delete_everything"])])
        try:
            await mcp.start()
        finally:
            await mcp.close()

    with pytest.raises(RaylaneError) as e:
        run(go())
    msg = str(e.value)
    assert "mcp_servers[0]" in msg and "allow_tools" in msg and "does not offer delete_everything" in msg
    assert "it offers: add, crash, fail, key, note, pid, secret, slow, upper" in msg


def test_http_headers_come_from_the_environment(http_url, monkeypatch):
    async def start():
        mcp = McpTools([server_spec("http", http_url, connect_timeout_s=10)])
        try:
            return [t.name for t in await mcp.start()]
        finally:
            await mcp.close()

    monkeypatch.delenv("MCP_TEST_AUTH", raising=False)
    with pytest.raises(RaylaneError, match=r"mcp_servers\[0\] \(remote\): environment variable\(s\) MCP_TEST_AUTH"):
        run(start())
    monkeypatch.setenv("MCP_TEST_AUTH", "Bearer wrong")
    with pytest.raises(RaylaneError, match=r"could not connect to http://127\.0\.0\.1:\d+/mcp"):
        run(start())
    monkeypatch.setenv("MCP_TEST_AUTH", TOKEN)
    assert "remote__add" in run(start())


def test_unreachable_server_and_missing_command_are_clear_errors():
    async def start(entry):
        mcp = McpTools([entry])
        try:
            await mcp.start()
        finally:
            await mcp.close()

    with pytest.raises(RaylaneError, match=r"could not start `/nonexistent/mcp-server`"):
        run(start(server_spec("stdio", command="/nonexistent/mcp-server", args=[])))
    with pytest.raises(RaylaneError, match=r"could not connect to http://127\.0\.0\.1:\d+/mcp"):
        run(start(server_spec("http", f"http://127.0.0.1:{free_port()}/mcp", headers_env={})))


@pytest.mark.parametrize("entry, words", [
    ({"transport": "ws", "url": "http://x/mcp"}, ["mcp_servers[0].transport", "'stdio' or 'http'"]),
    ({"transport": "stdio"}, ["mcp_servers[0]", "transport stdio needs command"]),
    ({"transport": "http"}, ["transport http needs url"]),
    ({"transport": "http", "url": "http://x/mcp", "command": "python"}, ["only transport stdio takes command"]),
    ({"transport": "http", "url": "http://x/mcp", "headers_env": {"Authorization": "Bearer abc"}},
     ["headers_env values must be environment variable names"]),
    ({"transport": "http", "url": "http://x/mcp", "allow_tools": []}, ["mcp_servers[0].allow_tools"]),
    ({"transport": "http", "url": "http://x/mcp", "side_effects": ["rm"]}, ["side_effects names tools not in allow_tools: rm"]),
    ({"transport": "http", "url": "http://x/mcp", "name": "a__b"}, ["mcp_servers[0].name", "no '__'"]),
    ({"transport": "http", "url": "http://x/mcp", "alow_tools": ["add"]}, ["did you mean 'allow_tools'"]),
])
def test_spec_errors_name_the_field(entry, words):
    full = {"name": "t", "allow_tools": ["add"], **entry}
    if "alow_tools" in entry:
        full.pop("allow_tools")
    with pytest.raises(RaylaneError) as e:
        parse_spec({"kind": "Agent", "name": "a", "auth": "none", "mcp_servers": [full]})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_mcp_tool_names_may_not_collide_with_the_agents_tools():
    server = {"name": "calc", "transport": "stdio", "command": "python", "allow_tools": ["tool"]}
    with pytest.raises(RaylaneError, match=r"mcp_servers\[0\] \(calc\): tool name\(s\) calc__tool are already tools"):
        parse_spec({"kind": "Agent", "name": "a", "auth": "none", "mcp_servers": [server],
                    "tools": [{"name": "calc__tool", "import_path": "runtime.agents.tools:calculator"}]})
    with pytest.raises(RaylaneError, match="mcp_servers names must be unique; repeated: calc"):
        parse_spec({"kind": "Agent", "name": "a", "auth": "none", "mcp_servers": [server, server]})


def test_schema_conversion_closes_objects_and_rejects_what_cannot_guide():
    assert tool_schema({"type": "object"}, "t") == {"type": "object", "properties": {}, "additionalProperties": False}
    kept = tool_schema({"type": "object", "additionalProperties": True, "$schema": "x"}, "t")
    assert kept == {"type": "object", "properties": {}, "additionalProperties": True}  # the server's choice stays
    with pytest.raises(RaylaneError, match="t: the server's inputSchema is not a JSON object schema"):
        tool_schema({"type": "string"}, "t")
    with pytest.raises(RaylaneError, match="not a valid JSON schema"):
        tool_schema({"type": "object", "properties": {"a": {"type": 3}}}, "t")


def test_ingress_accepts_mcp_tool_names_in_allow_tools():
    from runtime.agents.app import request_validator
    from runtime.agents.config import agent_app_config

    spec = parse_spec({"kind": "Agent", "name": "a", "auth": "none", "llm": {"url": "http://x/v1"},
                       "mcp_servers": [{"name": "fs", "transport": "http", "url": "http://x/mcp",
                                        "allow_tools": ["write.file"]}]})
    assert spec.mcp_servers[0].tool_names() == ["fs__write_file"]
    cfg = agent_app_config(spec, [], None)
    assert cfg["mcp_servers"][0]["url"] == "http://x/mcp"  # plain data for the workers, nothing connected here
    check = request_validator(100, ["fs__write_file"])
    check("/sessions", {"allow_tools": ["fs__write_file"]})
