"""A small MCP server for the agent tests, written with the official ``mcp`` package.

    python tests/agent/mcp_server.py                 # stdio (what a spec's transport: stdio starts)
    python tests/agent/mcp_server.py --http PORT     # streamable HTTP on 127.0.0.1:PORT/mcp

Tools: ``add`` (read-only), ``slow`` (sleeps; for timeouts), ``fail`` (an error result),
``upper`` (a short string, for the tiny model), ``key`` (echoes the call's ``_meta``
idempotency key), ``pid``, ``crash`` (the process exits), ``note`` (no read-only hint: a side effect; counts its calls in a file when MCP_TEST_NOTES is
set) and ``secret`` (not meant to be allowed). With ``--require-header NAME=VALUE`` over HTTP,
requests without that header get 401.
"""

from __future__ import annotations

import argparse
import os
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

server = MCPServer("raylane-test", log_level="WARNING")
READ_ONLY = ToolAnnotations(read_only_hint=True)


@server.tool(annotations=READ_ONLY)
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(annotations=READ_ONLY)
async def slow(seconds: float) -> str:
    """Sleep for a while, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds:g} s"


@server.tool(annotations=READ_ONLY)
def fail(message: str) -> str:
    """Always fails with the given message."""
    raise ToolError(f"fail tool: {message}")  # reaches the client as an error result


@server.tool()
def note(text: Annotated[str, Field(max_length=40)]) -> str:
    """Write a note (a side effect)."""
    path = os.environ.get("MCP_TEST_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")
    return f"noted: {text}"


@server.tool(annotations=READ_ONLY)
def upper(text: Annotated[str, Field(max_length=24)]) -> str:
    """Upper-case a short text."""
    return text.upper()


@server.tool(annotations=READ_ONLY)
def key(ctx: Context) -> str:
    """The idempotency key the client sent in the call's _meta ('none' without one)."""
    meta = ctx.request_context.meta or {}
    return str(meta.get("idempotency_key", "none"))


@server.tool(annotations=READ_ONLY)
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool(annotations=READ_ONLY)
def crash() -> str:
    """The server process exits mid-call."""
    os._exit(3)


@server.tool(annotations=READ_ONLY)
def secret() -> str:
    """Not allowed by the tests' specs."""
    return "secret"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--http", type=int, help="serve streamable HTTP on this port instead of stdio")
    p.add_argument("--require-header", help="NAME=VALUE every HTTP request must carry")
    a = p.parse_args()
    if a.http is None:
        server.run()
        return
    import uvicorn

    app = server.streamable_http_app()
    if a.require_header:
        name, _, value = a.require_header.partition("=")
        inner = app

        async def app(scope, receive, send):  # a bearer check in front of the MCP endpoint
            if scope["type"] == "http" and dict(scope["headers"]).get(name.lower().encode()) != value.encode():
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
            await inner(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=a.http, log_level="warning")


if __name__ == "__main__":
    main()
