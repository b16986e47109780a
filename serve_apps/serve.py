"""OpenAI-compatible LLM endpoint (Ray Serve + vLLM) built from an ``OnlineInference`` spec.

    serve run serve_apps.serve:app spec=examples/serve.yaml
    serve deploy serve-config.yaml        # from `raylane render SPEC --serve-config`

``args["spec"]`` is a path to the spec YAML or the spec itself as a mapping (what the rendered
Serve config and KubeRay's serveConfigV2 carry).
"""

from __future__ import annotations

from typing import Any

from runtime.specs import OnlineInferenceSpec
from serve_apps._common import spec_from_args


def build_serve_app(args: dict[str, Any]):
    """Validate ``args`` (``{"spec": PATH or mapping}``), then build the app."""
    spec = spec_from_args(args, OnlineInferenceSpec, "serve_apps.serve")
    from runtime.serving.app import build_app  # Ray Serve LLM loads only for a valid spec

    return build_app(spec)


app = build_serve_app  # ``serve run serve_apps.serve:app spec=PATH`` (Serve passes spec=PATH as args)
