"""One way to put raylane's Serve applications on a cluster: exactly what a Serve config lists.

>>> from runtime.serving.deploy import deploy
>>> deploy(spec.shape.serve_config(spec), host="127.0.0.1", port=8000)   # doctest: +SKIP
['chat']

``raylane run`` (serving and agents), ``serve deploy`` and a KubeRay RayService all start from the
same config (``build_serve_config`` / ``build_agent_serve_config``): for each application, its
``import_path`` called with its ``args``, under its ``name`` and ``route_prefix``. Local runs only
choose where the proxy listens, so the three cannot drift apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from runtime.errors import RaylaneError
from runtime.imports import load_callable
from runtime.log import logger
from runtime.ray_env import free_port  # noqa: F401  (the runners and tests import it from here)

_log = logger("serve")


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
ALL_INTERFACES = "0.0.0.0"


def bind_host(host: str, *, remote: bool, nodes: int, auth: str) -> tuple[str, str | None]:
    """Where Serve's HTTP listens for a run on a cluster, and a note saying why when that is not
    ``host``. Under HAProxy every node's proxy forwards to replicas' own HTTP ports, which bind this
    host: on loopback a replica on another node is unreachable. So a loopback ``host`` becomes
    0.0.0.0 when the cluster has more than one node or is remote (``--address``: it may grow)."""
    if host not in LOOPBACK or (not remote and nodes <= 1):
        return host, None
    why = f"the cluster has {nodes} nodes" if nodes > 1 else "the cluster is remote (--address) and may add nodes"
    note = (f"binding Serve's HTTP on {ALL_INTERFACES}, not {host}: {why}, and HAProxy on each node must reach "
            "replicas on the others")
    note += ("; auth stays on (the guard checks keys on every route)" if auth == "api-key" else
             "; auth is none: the endpoint is open to anyone who reaches a node (set auth: api-key)")
    return ALL_INTERFACES, note


def cluster_shape() -> tuple[int, str | None]:
    """(alive nodes, the head node's IP) of the connected cluster."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    head = next((n for n in alive if "node:__internal_head__" in n.get("Resources", {})), None)
    return len(alive), (head or {}).get("NodeManagerAddress")


def deploy(config: dict[str, Any], *, host: str, port: int, timeout_s: float = 900.0) -> list[str]:
    """Start Serve's proxy on ``host:port`` and deploy every application of ``config`` (a Serve
    config dict); returns their names once each is RUNNING. A failed deploy is one RaylaneError."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port},
                proxy_location=config.get("proxy_location", "EveryNode"))
    names = []
    for app in config["applications"]:
        builder = load_callable(app["import_path"], field=f"applications[{app['name']}].import_path")
        try:
            serve.run(builder(app.get("args") or {}), name=app["name"], route_prefix=app["route_prefix"],
                      blocking=False)
            wait_ready(app["name"], timeout_s)
        except RaylaneError:
            raise
        except Exception as e:  # Serve reports a failed deploy as RuntimeError with the replica's log
            raise RaylaneError(
                f"serving {app['name']!r} failed to start: {_first_line(e)}",
                hint="check the replica logs (ray dashboard or /tmp/ray/session_latest/logs/serve)",
            ) from None
        names.append(app["name"])
    return names


def wait_ready(name: str, timeout_s: float) -> None:
    """Return once the Serve application ``name`` is RUNNING; raise with its error if it failed."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        state = str(getattr(status, "status", "")).split(".")[-1]
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            msg = getattr(status, "message", "") or ""
            for dep in (getattr(status, "deployments", {}) or {}).values():
                if getattr(dep, "message", ""):
                    msg = dep.message
            raise RaylaneError(f"application {name!r} is {state}: {_clean(msg)}",
                               hint="fix the cause above and run again")
        if state != last:
            last = state
            _log(f"  {name}: {state or 'starting'}")
        time.sleep(1.0)
    raise RaylaneError(f"application {name!r} not ready after {timeout_s:.0f} s", hint="check `serve status`")


def serve_until_interrupted(log, on_exit: Callable[[], None] | None = None) -> float:
    """Block until Ctrl-C (SIGINT) or SIGTERM, then run ``on_exit`` and shut Serve down; returns
    the seconds served (``raylane run`` for the served shapes).

    Both signals are caught explicitly: a process started from a background job of a
    non-interactive shell inherits SIGINT ignored, and SIGTERM is what ``kill``, supervisors and
    Kubernetes send; either way the apps are deleted rather than left running."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        log("interrupted; shutting down")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if on_exit is not None:
            on_exit()
        import ray
        from ray import serve

        if ray.is_initialized():  # never start (or join) a cluster only to shut Serve down
            serve.shutdown()
    return round(time.perf_counter() - t0, 1)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "Error" in line or "error" in line:
            return line.strip()[:500]
    return text.splitlines()[0][:500] if text else type(e).__name__


def _clean(msg: str) -> str:
    """A Serve failure message without the Python traceback it wraps."""
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln and not ln.startswith(" "):
            return ln.strip()[:800]
    return (lines[-1] if lines else msg)[:800]
