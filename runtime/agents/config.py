"""From an ``AgentSpec`` to Serve configuration: the agent app and, when the model is served
beside it, its LLM app. One source for ``raylane run``, ``serve deploy`` and KubeRay's
RayService ``serveConfigV2``.

>>> from runtime.specs import parse_spec
>>> cfg = build_agent_serve_config(parse_spec({"kind": "Agent", "name": "helper", "auth": "none"}))
>>> [(a["name"], a["import_path"]) for a in cfg["applications"]]
[('helper-llm', 'serve_apps.serve:build_serve_app'), ('helper', 'serve_apps.agent:build_agent_app')]

Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

from typing import Any

from runtime.agents.loop import AgentConfig
from runtime.serving.config import build_serve_config
from runtime.specs import OnlineInferenceSpec, dump_spec

LLM_ROUTE_PREFIX = "/llm"
GUIDED_ENGINE_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}


def llm_app_name(spec) -> str:
    return f"{spec.name}-llm"


def llm_spec(spec):
    """The ``OnlineInference`` spec of the model served beside the agent (None with llm.url)."""
    if spec.llm.url:
        return None
    engine_kwargs = dict(spec.llm.engine_kwargs)
    if spec.llm.guided_json:
        # In vLLM 0.29 compact JSON is an engine setting, not a request field: without it a
        # weak model pads guided JSON with whitespace until max_tokens.
        engine_kwargs.setdefault("structured_outputs_config", GUIDED_ENGINE_CONFIG)
    return OnlineInferenceSpec(
        name=llm_app_name(spec), model=spec.llm.model, model_id=spec.llm.model_id, max_model_len=spec.llm.max_model_len,
        engine_kwargs=engine_kwargs, auth=spec.auth, resources=spec.resources,
        storage=spec.storage, port=spec.port,
    )


def build_agent_serve_config(spec) -> dict[str, Any]:
    """The dict ``serve deploy`` accepts: the LLM app served beside the agent (first: the agent's
    sessions call it) and the agent app, each with its spec embedded as args."""
    apps = []
    lspec = llm_spec(spec)
    if lspec is not None:
        llm_app = build_serve_config(lspec)["applications"][0]
        apps.append({**llm_app, "route_prefix": LLM_ROUTE_PREFIX})
    apps.append({"name": spec.name, "route_prefix": spec.route_prefix, "import_path": spec.shape.serve_app,
                 "args": {"spec": dump_spec(spec)}})
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": spec.port},
            "applications": apps}


def agent_app_config(spec, tools: list, index_uri: str | None) -> dict[str, Any]:
    """The plain data every session actor is built from (tools already imported and checked)."""
    loop = AgentConfig.from_spec(spec, tools)
    if spec.llm.url:
        llm = {"url": spec.llm.url, "model_id": spec.llm.model_id, "api_key_env": spec.llm.api_key_env}
    else:
        llm = {"serve_app": llm_app_name(spec), "model_id": llm_spec(spec).served_model_id}
    return {
        "app": spec.name,
        "session_workers": spec.session_workers,
        # Quota per API key; None with auth: none, where there is no key to count by.
        "max_sessions_per_key": spec.max_sessions_per_key if spec.auth == "api-key" else None,
        "tools": tools,
        # Plain data: each session worker connects to these itself (runtime.agents.mcptools).
        "mcp_servers": [s.model_dump() for s in spec.mcp_servers],
        "index": index_uri,
        "llm": llm,
        "store": {"backend": spec.sessions.backend, "url": spec.sessions.url, "run_dir": _local_run_dir(spec)},
        "loop": loop,  # the AgentConfig itself: every actor gets the same typed settings
    }


def index_uri(spec) -> str | None:
    if spec.retrieval is None:
        return None
    return spec.retrieval.index or f"{spec.run_dir()}/index"


def _local_run_dir(spec) -> str:
    from pathlib import Path

    run_dir = spec.run_dir()
    return run_dir if "://" in run_dir else str(Path(run_dir).expanduser().resolve())
