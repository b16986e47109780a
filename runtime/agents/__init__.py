"""Agents on Ray actors (``kind: Agent``): tool calls by guided JSON, retrieval over a Ray Data
index, per-session budgets, sessions persisted after every step, a span per step.

>>> from runtime.specs import load_spec
>>> from runtime.agents import run_agent, start_agent, build_agent_serve_config
>>> build_agent_serve_config(load_spec("examples/agent.yaml"))   # serve deploy / RayService  # doctest: +SKIP
>>> run_agent(load_spec("examples/agent.yaml"))                  # serves until Ctrl-C        # doctest: +SKIP

Ray, vLLM and FastAPI load only when an agent starts.
"""

from runtime.agents.config import build_agent_serve_config
from runtime.agents.runner import (
           AgentServeResult,
           build_agent_application,
           run_agent,
           start_agent,
           stop_agent,
)

__all__ = [
           "AgentServeResult",
           "build_agent_application",
           "build_agent_serve_config",
           "run_agent",
           "start_agent",
           "stop_agent",
]
