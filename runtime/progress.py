"""Progress notes from raylane's own code, apart from Ray's, Serve's and vLLM's logs.

>>> from runtime.progress import note
>>> note("batch", "rows 50/200  69 tok/s")              # "[batch] rows 50/200  69 tok/s" on stderr
>>> note("serve", "ready: http://127.0.0.1:8000/v1", keep=True)   # doctest: +SKIP

A note always goes to stderr (where the engines log too, so it reads in context there). A
front end such as the CLI can also ``listen`` to notes and show them apart: the CLI sends the
engines' logs to a file and shows notes on the terminal, ``keep=True`` ones (an endpoint that
is ready) as lines of their own, the others as the running stage's status.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

Listener = Callable[[str, str, bool], None]
_listeners: list[Listener] = []


def note(source: str, msg: str, *, keep: bool = False) -> None:
    print(f"[{source}] {msg}", file=sys.stderr, flush=True)
    for fn in list(_listeners):
        fn(source, msg, keep)


@contextlib.contextmanager
def listen(fn: Listener) -> Iterator[None]:
    """Call ``fn(source, msg, keep)`` for every note made inside the block."""
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)
