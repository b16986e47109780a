"""Defaults every layer shares, defined once.

>>> from runtime.defaults import DEFAULT_STORAGE_ROOT
>>> DEFAULT_STORAGE_ROOT
'~/.raylane'
"""

from __future__ import annotations

import os

DEFAULT_STORAGE_ROOT = "~/.raylane"
STORAGE_ROOT_ENV = "RAYLANE_STORAGE_ROOT"


def default_storage_root() -> str:
    """``$RAYLANE_STORAGE_ROOT``, else ``~/.raylane``: the root a spec without ``storage.root`` uses."""
    return os.environ.get(STORAGE_ROOT_ENV, DEFAULT_STORAGE_ROOT)
