"""raylane's SDK: specs, runners, placement, registry and planning for five AI workload shapes.

Notebook use mirrors the CLI, one public function per command:

>>> import runtime
>>> spec = runtime.load_spec("examples/batch.yaml")          # raylane validate   # doctest: +SKIP
>>> result = runtime.run(spec, address="10.0.0.5:6379")       # raylane run        # doctest: +SKIP
>>> runtime.classify(new_artifact=False, latency_budget_ms=50).shape              # raylane classify
'online-inference'
>>> runtime.plan(params=7e9, dtype="fp16").weights_gb                              # raylane plan
14.0

Heavy libraries (torch, vLLM, Ray) load only when a function needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_spec": "runtime.specs",
    "parse_spec": "runtime.specs",
    "dump_spec": "runtime.specs",
    "run": "runtime.run",
    "classify": "runtime.classify",
    "plan": "runtime.planning",
    "plan_agent": "runtime.planning_agents",
    "write_tiny_model": "runtime.tiny_model",
    "init_ray": "runtime.ray_env",
    "ray_session": "runtime.ray_env",
    "shutdown_ray": "runtime.ray_env",
    "run_training": "runtime.training",
    "run_finetune": "runtime.training",
    "run_batch": "runtime.batch",
    "verify_output": "runtime.batch",
    "quickstart": "runtime.quickstart",
    "RaylaneError": "runtime.errors",
    "SpecError": "runtime.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
