"""Run any spec: the one function behind ``raylane run`` and ``jobs.*``.

>>> from runtime import load_spec, run
>>> result = run(load_spec("examples/batch.yaml"))       # doctest: +SKIP
>>> result.to_dict()["rows_out"]                          # doctest: +SKIP

Each shape has its own runner module (no shape branches here); this table only maps a spec
kind to it, imported lazily so that `raylane validate` never loads torch or vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

from runtime.errors import RaylaneError
from runtime.specs import SpecBase

RUNNERS: dict[str, str] = {
    "Training": "runtime.training:run_training",
    "FineTune": "runtime.training:run_finetune",
    "BatchInference": "runtime.batch:run_batch",
    "OnlineInference": "runtime.serving:run_serving",
    "Agent": "runtime.agents:run_agent",
}


def runner_for(kind: str):
    target = RUNNERS.get(kind)
    module_name, _, attr = (target or "").partition(":")
    try:
        module = importlib.import_module(module_name) if target else None
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            module = None
        else:
            raise
    fn = getattr(module, attr, None) if module else None
    if fn is None:
        raise RaylaneError(
            f"this raylane cannot run {kind} specs yet",
            hint="`raylane validate` checks the spec; see the README for the shapes that run today",
        )
    return fn


def run(spec: SpecBase, *, address: str | None = None, **options: Any):
    """Run ``spec`` locally or on the Ray cluster at ``address``; returns the shape's result object."""
    return runner_for(spec.kind)(spec, address=address, **options)
