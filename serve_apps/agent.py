"""The agent's HTTP ingress (Ray Serve) built from an ``Agent`` spec.

    serve run serve_apps.agent:app spec=examples/agent.yaml
    serve deploy agent-serve-config.yaml    # runtime.agents.build_agent_serve_config(spec)

``args["spec"]`` is a path to the spec YAML or the spec itself as a mapping (what the Serve config
and KubeRay's serveConfigV2 carry). With ``llm.model`` the LLM app must be deployed beside it
(the Serve config has both; ``raylane run`` deploys both).
"""

from __future__ import annotations

from typing import Any

from runtime.agents import build_agent_application
from runtime.specs import AgentSpec
from serve_apps._common import spec_from_args


def build_agent_app(args: dict[str, Any]):
    """Validate ``args`` (``{"spec": PATH or mapping}``), then build the app."""
    return build_agent_application(spec_from_args(args, AgentSpec, "serve_apps.agent"))


app = build_agent_app  # ``serve run serve_apps.agent:app spec=PATH`` (Serve passes spec=PATH as args)
