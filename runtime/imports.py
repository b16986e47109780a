"""``"module:attr"`` import paths: how a spec names your code (a loss, a metric, a tool).

>>> from runtime.imports import load_callable
>>> load_callable("json:dumps", field="train.step_fn")([1])
'[1]'

One checker for spec validation (``check_import_path``) and one loader whose error names the spec
field that held the path, so a typo in ``eval.metric`` says ``eval.metric``, not a traceback.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from runtime.errors import RaylaneError

IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_import_path(value: str | None, example: str = "package.module:function") -> str | None:
    """A pydantic validator body: ``value`` unchanged, or a ValueError saying the expected form."""
    if value is not None and not IMPORT_PATH_RE.match(value):
        raise ValueError(f"must be an import path like {example!r}, got {value!r}")
    return value


def load_callable(path: str, *, field: str, hint: str | None = None) -> Callable[..., Any]:
    """The function ``path`` names; a RaylaneError naming ``field`` when it cannot be imported."""
    module_name, _, attr = path.partition(":")
    where = hint or "the module must be importable where the run happens (on a cluster: in the working_dir or image)"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RaylaneError(f"{field}: cannot import {module_name!r} from {path!r} ({e})", hint=where) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RaylaneError(f"{field}: {module_name} has no function {attr!r} (from {path!r})", hint=where)
    return fn
