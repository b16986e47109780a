"""OpenAI-compatible LLM endpoint (Ray Serve + vLLM) built from an ``OnlineInference`` spec.

    serve run serve_apps.serve:app spec=examples/serve.yaml
    serve deploy serve-config.yaml        # from `raylane render SPEC --serve-config`

``args["spec"]`` is a path to the spec YAML or the spec itself as a mapping (what the rendered
Serve config and KubeRay's serveConfigV2 carry).
"""

from __future__ import annotations

from typing import Any


def build_serve_app(args: dict[str, Any]):
    """Validate ``args`` (``{"spec": PATH or mapping}``), then build the app."""
    from runtime.errors import SpecError, SpecProblem
    from runtime.specs import OnlineInferenceSpec, load_spec, parse_spec

    unknown = sorted(set(args) - {"spec"})
    if "spec" not in args or unknown:
        raise SpecError("serve_apps.serve args", [SpecProblem("spec", "required: a spec path or mapping")]
                        + [SpecProblem(k, "unknown argument") for k in unknown])
    source = args["spec"]
    spec = load_spec(source) if isinstance(source, str) else parse_spec(source, source="args.spec")
    if not isinstance(spec, OnlineInferenceSpec):
        raise SpecError(str(source), [SpecProblem("kind", f"serve_apps.serve serves OnlineInference specs, not {spec.kind}")])
    from runtime.serving.app import build_app  # Ray Serve LLM loads only for a valid spec

    return build_app(spec)


def app(args: dict[str, Any]):
    """``serve run serve_apps.serve:app spec=PATH`` entry point (Serve passes ``spec=PATH`` as args)."""
    return build_serve_app(args)
