"""Alias of ``serve_apps.serve`` (the import path earlier releases documented).

    serve run serve_apps.llm:app spec=examples/serve.yaml
"""

from serve_apps.serve import app, build_serve_app

build_llm_app = build_serve_app

__all__ = ["app", "build_llm_app", "build_serve_app"]
