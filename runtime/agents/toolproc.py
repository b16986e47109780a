"""A pool of tool processes beside a session worker: a tool call is a pipe round trip, and a
hung call is ended by killing its process.

>>> pool = ToolProcessPool()                                                        # doctest: +SKIP
>>> await pool.run("runtime.agents.tools:calculator", {"expression": "1+1"}, {}, timeout_s=5)  # doctest: +SKIP
('2', 0.00004)

Why not a Ray task per call: submitting a task and awaiting its result cost ~4.8 ms a call on
the development machine (most of the agent's per-step overhead); a request over a pipe to a
process that is already running costs ~0.1-0.3 ms. The process is what makes a hung tool
killable: on a timeout the pool SIGKILLs it and starts a fresh one for the next call, so the
session worker itself never runs tool code. Each process runs one call at a time; the pool
starts more when calls overlap (bounded by the tools' concurrency limits) and keeps a few idle.

The child is a few lines of plain Python (no raylane imports): it takes the worker's
``sys.path`` first (so tools import exactly as in the worker, working_dir included), then
answers length-prefixed pickles. Its stdout is moved to stderr, so a tool that prints cannot
corrupt the protocol; its output lands in the session worker's log.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
import sys
import time
from typing import Any

_CHILD = r"""
import importlib, os, pickle, struct, sys, time
rin = os.fdopen(os.dup(0), "rb", buffering=0)
wout = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)

def read(n):
    buf = b""
    while len(buf) < n:
        chunk = rin.read(n - len(buf))
        if not chunk:
            os._exit(0)  # the session worker closed the pipe or died
        buf += chunk
    return buf

def recv():
    return pickle.loads(read(struct.unpack(">I", read(4))[0]))

sys.path[:] = recv()
fns = {}
while True:
    path, args, bound = recv()
    t0 = time.perf_counter()
    try:
        fn = fns.get(path)
        if fn is None:
            module, _, attr = path.partition(":")
            fn = fns[path] = getattr(importlib.import_module(module), attr)
        msg = ("ok", fn(**args, **bound))
    except Exception as e:
        msg = ("err", (type(e).__name__ + ": " + str(e)).strip()[:500])
    secs = time.perf_counter() - t0
    try:
        data = pickle.dumps((*msg, secs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        data = pickle.dumps(("err", "tool result cannot be pickled: " + (type(e).__name__ + ": " + str(e))[:400], secs))
    wout.write(struct.pack(">I", len(data)) + data)
"""


class ToolError(Exception):
    """The tool raised (the message is ``Type: text``), or its process died."""


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack(">I", len(data)) + data


class _Proc:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    async def call(self, request: tuple) -> tuple:
        self.proc.stdin.write(_frame(request))
        await self.proc.stdin.drain()
        (n,) = struct.unpack(">I", await self.proc.stdout.readexactly(4))
        return pickle.loads(await self.proc.stdout.readexactly(n))

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.is_closing():
            self.proc.stdin.close()  # the child reads EOF and exits


class ToolProcessPool:
    """Tool processes of one session worker (create it inside the worker's event loop)."""

    def __init__(self, max_idle: int = 4):
        self.max_idle = max_idle
        self._idle: list[_Proc] = []
        self._exiting: set[asyncio.Future] = set()  # waits for processes that were told to go
        self.started = 0  # processes started so far (a timeout or crash costs one)

    def _retire(self, p: _Proc, kill: bool) -> None:
        p.kill() if kill else p.close()
        w = asyncio.ensure_future(p.proc.wait())
        self._exiting.add(w)
        w.add_done_callback(self._exiting.discard)

    async def _spawn(self) -> _Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-u", "-c", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        p = _Proc(proc)
        p.proc.stdin.write(_frame(list(sys.path)))
        self.started += 1
        return p

    async def warm(self, n: int = 1) -> None:
        while len(self._idle) < n:
            self._idle.append(await self._spawn())

    async def run(self, import_path: str, arguments: dict, bound: dict, timeout_s: float) -> tuple[Any, float]:
        """(result, the tool's own run seconds); raises ``TimeoutError`` (the process was killed)
        or ``ToolError``."""
        p = self._idle.pop() if self._idle else await self._spawn()
        try:
            status, value, secs = await asyncio.wait_for(p.call((import_path, arguments, bound)), timeout_s)
        except (asyncio.IncompleteReadError, ConnectionError):
            rc = await p.proc.wait()
            raise ToolError(f"tool process exited with code {rc} during the call") from None
        except BaseException:  # timed out or cancelled mid-call: the tool may still be running
            self._retire(p, kill=True)
            raise
        if len(self._idle) < self.max_idle:
            self._idle.append(p)
        else:
            self._retire(p, kill=False)
        if status != "ok":
            raise ToolError(value)
        return value, secs

    async def aclose(self) -> None:
        """Let the idle processes exit (EOF on their pipe) and wait for every process told to go."""
        while self._idle:
            self._retire(self._idle.pop(), kill=False)
        if self._exiting:
            await asyncio.wait(list(self._exiting), timeout=5)


async def _roundtrip_us(n: int = 200) -> float:
    """Median microseconds of one call of a trivial tool (``python -m runtime.agents.toolproc``)."""
    pool = ToolProcessPool()
    await pool.warm()
    await pool.run("runtime.agents.tools:calculator", {"expression": "1"}, {}, 10)
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        await pool.run("runtime.agents.tools:calculator", {"expression": "1+1"}, {}, 10)
        xs.append(time.perf_counter() - t)
    await pool.aclose()
    return sorted(xs)[n // 2] * 1e6


if __name__ == "__main__":
    print(f"tool process round trip p50: {asyncio.run(_roundtrip_us()):.0f} us")
