"""Run an ``Agent`` spec: build the retrieval index (a Ray Data job), serve the LLM app beside
the agent (unless ``llm.url`` points elsewhere), deploy the agent ingress, serve until Ctrl-C.

>>> from runtime.specs import load_spec
>>> from runtime.agents import start_agent, stop_agent
>>> served = start_agent(load_spec("examples/agent.yaml"), port=0)    # returns when ready  # doctest: +SKIP
>>> served.url                                                        # POST {url}/sessions  # doctest: +SKIP
>>> stop_agent(served)                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.agents.app import build_ingress
from runtime.agents.config import agent_app_config, index_uri, llm_app_name
from runtime.agents.retrieval import build_index, read_manifest
from runtime.agents.store import check_shared
from runtime.agents.tools import load_tools
from runtime.agents.worker import SessionRouter, close_and_kill
from runtime.errors import RaylaneError
from runtime.log import logger
from runtime.ray_env import init_ray
from runtime.serving.deploy import deploy, free_port, serve_until_interrupted
from runtime.serving.keys import load_api_keys
from runtime.serving.runner import serving_host


@dataclass
class AgentServeResult:
    name: str
    url: str
    llm: str
    auth: str
    tools: list[str]
    index: dict[str, Any] | None
    session_store: str
    ray_address: str
    ready_seconds: float
    served_seconds: float | None = None
    ok: bool = True
    apps: list[str] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)  # the detached session actors

    def to_dict(self) -> dict:
        return asdict(self)


_log = logger("agent")


def ensure_index(spec) -> dict[str, Any] | None:
    """Build the retrieval index unless a complete one exists (Ray must be initialised)."""
    if spec.retrieval is None:
        return None
    uri = index_uri(spec)
    manifest = None if spec.retrieval.rebuild else read_manifest(uri)
    if manifest is None:
        r = spec.retrieval
        _log(f"indexing {r.corpus} -> {uri} (Ray Data: chunk, embed, write)")
        manifest = build_index(r.corpus, uri, text_column=r.text_column, chunk_chars=r.chunk_chars,
                               chunk_overlap=r.chunk_overlap, dim=r.dim, work_dir=spec.run_dir())
        _log(f"indexed {manifest['chunks']} chunks in {manifest['built_s']} s")
    return {**manifest, "uri": uri}


def prepare_app_config(spec) -> dict[str, Any]:
    """Import and check the tools, make sure the index exists, and resolve the LLM target."""
    tools = load_tools(spec.tools, spec.retrieval, index_uri(spec))
    ensure_index(spec)
    return agent_app_config(spec, tools, index_uri(spec))


def build_agent_application(spec):
    """The Serve application for an ``AgentSpec`` (what ``serve_apps.agent`` returns)."""
    init_ray()  # inside `serve run` / a Serve controller this is the already-connected cluster
    return build_ingress(spec, prepare_app_config(spec), forward_keys=True)


def start_agent(spec, *, address: str | None = None, port: int | None = None, host: str = "127.0.0.1",
                timeout_s: float = 900.0) -> AgentServeResult:
    """Deploy the agent (and its LLM app) and return once both answer; ``port=0`` picks a free port.

    Deploys exactly the applications of ``build_agent_serve_config(spec)`` (what ``serve deploy``
    and a RayService get); only the proxy's host and port are local choices.
    """
    if spec.auth == "api-key":
        load_api_keys()  # fail before starting anything
    info = init_ray(address)
    host, url_host = serving_host(host, address, spec.auth)
    t0 = time.perf_counter()
    port = spec.port if port is None else (port or free_port(host))
    config = prepare_app_config(spec)
    # Before anything is deployed (the ingress checks again where Serve starts it: serve deploy, KubeRay).
    check_shared(**config["store"])
    serve_config = spec.shape.serve_config(spec)
    if spec.llm.model:
        _log(f"deploying the LLM app {llm_app_name(spec)!r} (model {spec.llm.model}); ~30 s to load on CPU")
    apps = deploy(serve_config, host=host, port=port, timeout_s=timeout_s)
    router = SessionRouter(config)
    warm_workers(router)
    url = f"http://{url_host}:{port}{spec.route_prefix.rstrip('/')}"
    tool_names = [t.name for t in config["tools"]] + [n for s in spec.mcp_servers for n in s.tool_names()]
    tools = ", ".join(tool_names) or "none"
    _log(f"ready: POST {url}/sessions, or OpenAI Responses at {url}/v1 (model {spec.name!r}; auth: {spec.auth}; "
         f"tools: {tools})", keep=True)
    store = spec.sessions.url or f"{config['store']['run_dir']}/sessions.db"
    return AgentServeResult(
        spec.name, url, spec.llm.url or f"serve app {llm_app_name(spec)} (model {spec.llm.model})", spec.auth,
        tool_names, _index_info(spec), f"{spec.sessions.backend}:{store}", info.address,
        round(time.perf_counter() - t0, 1), apps=apps, actors=list(router.names),
    )


def warm_workers(router: SessionRouter) -> None:
    """Start the session actors; an MCP server that fails (a tool not offered, no connection)
    is the user's error, raised without Ray's wrapping."""
    from ray.exceptions import RayTaskError

    try:
        router.warm()
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, RaylaneError):
            raise RaylaneError(str(cause)) from None
        raise


def _index_info(spec) -> dict[str, Any] | None:
    if spec.retrieval is None:
        return None
    return {**(read_manifest(index_uri(spec)) or {}), "uri": index_uri(spec)}


def stop_agent(*results: AgentServeResult) -> None:
    """Delete the apps and the session actors of one or more served agents (sessions stay in the
    store). All apps go in one request, so Serve drains their replicas at once."""
    from ray.serve.context import _get_global_client

    _get_global_client().delete_apps([name for r in results for name in reversed(r.apps)], blocking=True)
    close_and_kill(*(name for r in results for name in r.actors))


def run_agent(spec, *, address: str | None = None, port: int | None = None, block: bool = True,
              **_: Any) -> AgentServeResult:
    """``raylane run`` for Agent specs: serve until Ctrl-C (``block=False`` returns when ready)."""
    result = start_agent(spec, address=address, port=port)
    if not block:
        return result
    result.served_seconds = serve_until_interrupted(_log, on_exit=lambda: stop_agent(result))  # sessions stay
    return result
