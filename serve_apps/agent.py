"""The agent's HTTP ingress (Ray Serve) built from an ``Agent`` spec.

    serve run serve_apps.agent:app spec=examples/agent.yaml
    serve deploy agent-serve-config.yaml    # runtime.agents.build_agent_serve_config(spec)

``args["spec"]`` is a path to the spec YAML or the spec itself as a mapping (what the Serve config
and KubeRay's serveConfigV2 carry). With ``llm.model`` the LLM app must be deployed beside it
(the Serve config has both; ``raylane run`` deploys both).
"""

from __future__ import annotations

from typing import Any


def build_agent_app(args: dict[str, Any]):
    """Validate ``args`` (``{"spec": PATH or mapping}``), then build the app."""
    from runtime.agents import build_agent_application
    from runtime.errors import SpecError, SpecProblem
    from runtime.specs import AgentSpec, load_spec, parse_spec

    unknown = sorted(set(args) - {"spec"})
    if "spec" not in args or unknown:
        raise SpecError("serve_apps.agent args", [SpecProblem("spec", "required: a spec path or mapping")]
                        + [SpecProblem(k, "unknown argument") for k in unknown])
    source = args["spec"]
    spec = load_spec(source) if isinstance(source, str) else parse_spec(source, source="args.spec")
    if not isinstance(spec, AgentSpec):
        raise SpecError(str(source), [SpecProblem("kind", f"serve_apps.agent serves Agent specs, not {spec.kind}")])
    return build_agent_application(spec)


def app(args: dict[str, Any]):
    """``serve run serve_apps.agent:app spec=PATH`` entry point (Serve passes ``spec=PATH`` as args)."""
    return build_agent_app(args)
