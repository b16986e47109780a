"""raylane's own progress lines, apart from Ray's, Serve's and vLLM's logs.

>>> from runtime.log import logger, note
>>> log = logger("batch")
>>> log("rows 50/200  69 tok/s")                         # "[batch] rows 50/200  69 tok/s" on stderr  # doctest: +SKIP
>>> note("serve", "ready: http://127.0.0.1:8000/v1", keep=True)                                    # doctest: +SKIP

A note always goes to stderr (where the engines log too, so it reads in context there; stdout
stays free for results and ``--json``). A front end such as the CLI can also ``listen`` to notes
and show them apart: the CLI sends the engines' logs to a file and shows notes on the terminal,
``keep=True`` ones (an endpoint that is ready) as lines of their own, the others as the running
stage's status.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

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


def logger(prefix: str) -> Callable[..., None]:
    """``log(msg, keep=False)``: a note from one part of raylane (``[prefix] msg``)."""

    def log(msg: str, keep: bool = False) -> None:
        note(prefix, msg, keep=keep)

    log.__name__ = f"log_{prefix}"
    return log
