"""CLI output: one JSON object on stdout with ``--json``; everything else on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator


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
