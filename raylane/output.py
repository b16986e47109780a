"""CLI output: one JSON object on stdout with ``--json``; everything else on stderr. Commands
that start engines send the engines' logs to a file (``engine_logs``) unless ``--verbose``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO


def to_jsonable(result: Any) -> Any:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    return result


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[callable]:
    """Route fd 1 to stderr for the rest of the process, so Ray's and vLLM's prints (even from
    child processes, and Ray's log relay at interpreter exit) cannot corrupt the JSON; yields
    ``emit(obj)`` that writes the real stdout, whose only content is that one object."""
    if not enabled:
        yield lambda obj: print(json.dumps(to_jsonable(obj), indent=2, default=str))
        return
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        yield lambda obj: (out.write(json.dumps(to_jsonable(obj), default=str) + "\n"), out.flush())
    finally:
        sys.stdout.flush()
        out.close()


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Terminal:
    """The real terminal, whatever fds 1 and 2 point at: ``out`` (stdout), ``err`` (stderr)."""

    out: TextIO
    err: TextIO
    log_path: Path | None = None  # where the engines' logs go; None: they stream to the terminal


TAIL_LINES = 25
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def engine_logs(log_path: Path | None) -> Iterator[Terminal]:
    """Send everything this process and its children write to fds 1 and 2 (Ray's log relay of
    every worker, Serve, HAProxy, vLLM, Ray Train) to ``log_path``, for the rest of the process
    (Ray prints at interpreter exit too); yields the real terminal for raylane's own output.

    On an error the terminal gets fds 1 and 2 back, then the last lines of the log and its path,
    and the error goes on to the CLI's handler. ``log_path=None`` changes nothing (``--verbose``).
    """
    if log_path is None:
        yield Terminal(sys.stdout, sys.stderr)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    enc = {"encoding": sys.stderr.encoding or "utf-8", "errors": "replace"}
    term = Terminal(os.fdopen(os.dup(1), "w", buffering=1, **enc),
                    os.fdopen(os.dup(2), "w", buffering=1, **enc), log_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield term
    except BaseException:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        _print_tail(term.err, log_path)
        raise
    finally:
        for fd in saved:
            os.close(fd)


def _print_tail(err: TextIO, log_path: Path, n: int = TAIL_LINES) -> None:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    lines = [_ANSI.sub("", ln) for ln in lines if ln.strip()]
    if not lines:  # failed before anything logged (a spec or key problem): the error says it all
        with contextlib.suppress(OSError):
            log_path.unlink()
        return
    err.write(f"--- the last {min(n, len(lines))} lines of {log_path} ---\n")
    err.write("\n".join(lines[-n:]) + "\n---\n")
    err.write(f"full log (Ray, Serve, HAProxy, vLLM): {log_path}\n")
    err.flush()


def log_file(folder: str | Path, name: str) -> Path:
    """A new log file under ``folder``/logs, named after ``name`` and the time."""
    return Path(folder).expanduser().resolve() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
