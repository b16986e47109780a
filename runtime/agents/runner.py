"""Run an ``Agent`` spec: build the retrieval index (a Ray Data job), serve the LLM app beside
the agent (unless ``llm.url`` points elsewhere), deploy the agent ingress, serve until Ctrl-C.

>>> from runtime.specs import load_spec
>>> from runtime.agents import start_agent, stop_agent
>>> served = start_agent(load_spec("examples/agent.yaml"), port=0)    # returns when ready  # doctest: +SKIP
>>> served.url                                                        # POST {url}/sessions  # doctest: +SKIP
>>> stop_agent(served)                                                                       # doctest: +SKIP
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.errors import RaylaneError


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


def _log(msg: str, keep: bool = False) -> None:
    from runtime.progress import note

    note("agent", msg, keep=keep)


def ensure_index(spec) -> dict[str, Any] | None:
    """Build the retrieval index unless a complete one exists (Ray must be initialised)."""
    from runtime.agents.config import index_uri
    from runtime.agents.retrieval import build_index, read_manifest

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
    from runtime.agents.config import agent_app_config, index_uri
    from runtime.agents.tools import load_tools

    tools = load_tools(spec.tools, spec.retrieval, index_uri(spec))
    ensure_index(spec)
    return agent_app_config(spec, tools, index_uri(spec))


def build_agent_application(spec):
    """The Serve application for an ``AgentSpec`` (what ``serve_apps.agent`` returns)."""
    from runtime.agents.app import build_ingress
    from runtime.ray_env import init_ray

    init_ray()  # inside `serve run` / a Serve controller this is the already-connected cluster
    return build_ingress(spec, prepare_app_config(spec))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_ready(name: str, timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        state = str(getattr(status, "status", "")).split(".")[-1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            msgs = [getattr(status, "message", "")] + [d.message for d in (status.deployments or {}).values()]
            msg = next((m for m in reversed(msgs) if m), "")
            line = next((ln.strip() for ln in reversed(msg.splitlines()) if "Error" in ln), msg[-500:])
            raise RaylaneError(f"application {name!r} is {state}: {line}", hint="fix the cause above and run again")
        if state != last:
            _log(f"  {name}: {state or 'starting'}")
            last = state
        time.sleep(1.0)
    raise RaylaneError(f"application {name!r} not ready after {timeout_s:.0f} s", hint="check `serve status`")


def start_agent(spec, *, address: str | None = None, port: int | None = None, host: str = "127.0.0.1",
                timeout_s: float = 900.0) -> AgentServeResult:
    """Deploy the agent (and its LLM app) and return once both answer; ``port=0`` picks a free port."""
    from runtime.agents.config import LLM_ROUTE_PREFIX, llm_app_name, llm_spec
    from runtime.ray_env import init_ray

    if spec.auth == "api-key":
        from runtime.serving.guard import load_api_keys

        load_api_keys()  # fail before starting anything
    info = init_ray(address)
    from ray import serve

    t0 = time.perf_counter()
    port = spec.port if port is None else (port or _free_port(host))
    config = prepare_app_config(spec)
    serve.start(http_options={"host": host, "port": port})
    apps = []
    lspec = llm_spec(spec)
    if lspec is not None:
        from runtime.serving.app import build_app

        _log(f"deploying the LLM app {lspec.name!r} (model {lspec.model}); ~30 s to load on CPU")
        serve.run(build_app(lspec), name=lspec.name, route_prefix=LLM_ROUTE_PREFIX, blocking=False)
        _wait_ready(lspec.name, timeout_s)
        apps.append(lspec.name)
    from runtime.agents.app import build_ingress

    serve.run(build_ingress(spec, config, forward_keys=True), name=spec.name, route_prefix=spec.route_prefix, blocking=False)
    _wait_ready(spec.name, timeout_s)
    apps.append(spec.name)
    from runtime.agents.worker import SessionRouter

    router = SessionRouter(config)
    router.warm()
    url = f"http://{host}:{port}{spec.route_prefix.rstrip('/')}"
    tools = ", ".join(t.name for t in config["tools"]) or "none"
    _log(f"ready: POST {url}/sessions (auth: {spec.auth}; tools: {tools})", keep=True)
    store = spec.sessions.url or f"{config['store']['run_dir']}/sessions.db"
    return AgentServeResult(
        spec.name, url, spec.llm.url or f"serve app {llm_app_name(spec)} (model {spec.llm.model})", spec.auth,
        [t.name for t in config["tools"]], _index_info(spec), f"{spec.sessions.backend}:{store}", info.address,
        round(time.perf_counter() - t0, 1), apps=apps, actors=list(router.names),
    )


def _index_info(spec) -> dict[str, Any] | None:
    from runtime.agents.config import index_uri
    from runtime.agents.retrieval import read_manifest

    if spec.retrieval is None:
        return None
    return {**(read_manifest(index_uri(spec)) or {}), "uri": index_uri(spec)}


def stop_agent(result: AgentServeResult, spec=None) -> None:
    """Delete the apps and the session actors (sessions stay in the store). ``spec`` is unused;
    accepted for symmetry with ``start_agent``."""
    import ray
    from ray import serve

    from runtime.agents.worker import NAMESPACE

    for name in reversed(result.apps):
        serve.delete(name)
    for name in result.actors:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # never created, or already gone
            pass


def run_agent(spec, *, address: str | None = None, port: int | None = None, block: bool = True,
              **_: Any) -> AgentServeResult:
    """``raylane run`` for Agent specs: serve until Ctrl-C (``block=False`` returns when ready)."""
    result = start_agent(spec, address=address, port=port)
    if not block:
        return result
    t0 = time.perf_counter()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        _log("interrupted; shutting down (sessions stay in the store)")
    finally:
        stop_agent(result, spec)
        from ray import serve

        serve.shutdown()
    result.served_seconds = round(time.perf_counter() - t0, 1)
    return result
