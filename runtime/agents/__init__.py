"""Agents on Ray actors (``kind: Agent``): tool calls by guided JSON, retrieval over a Ray Data
index, per-session budgets, sessions persisted after every step, a span per step.

>>> from runtime.specs import load_spec
>>> from runtime.agents import run_agent, start_agent, build_agent_serve_config
>>> build_agent_serve_config(load_spec("examples/agent.yaml"))   # serve deploy / RayService  # doctest: +SKIP
>>> run_agent(load_spec("examples/agent.yaml"))                  # serves until Ctrl-C        # doctest: +SKIP

Ray, vLLM and FastAPI load only when an agent starts. The names below load on first use, so a
tool process importing ``runtime.agents.tools`` does not pay for specs and Serve configs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AgentServeResult": "runtime.agents.runner",
    "build_agent_application": "runtime.agents.runner",
    "build_agent_serve_config": "runtime.agents.config",
    "run_agent": "runtime.agents.runner",
    "start_agent": "runtime.agents.runner",
    "stop_agent": "runtime.agents.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime.agents' has no attribute {name!r}")
