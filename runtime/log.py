"""Progress lines on stderr, one prefix per part of raylane (``[batch] rows 100/1000``).

>>> from runtime.log import logger
>>> log = logger("batch")
>>> log("starting")          # prints "[batch] starting" to stderr          # doctest: +SKIP

stdout stays free for results (``--json``); every progress line goes through here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def logger(prefix: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)

    log.__name__ = f"log_{prefix}"
    return log
