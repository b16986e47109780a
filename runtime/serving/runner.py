"""Run an ``OnlineInference`` spec: start Serve on the Ray cluster, deploy the app, serve until
interrupted (``raylane run``), or return once it is ready (``start_serving``, for notebooks/tests).

>>> from runtime.specs import load_spec
>>> from runtime.serving import start_serving
>>> handle = start_serving(load_spec("examples/serve.yaml"), port=0)   # doctest: +SKIP
>>> handle.url                                                          # doctest: +SKIP
'http://127.0.0.1:41231'
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.errors import RaylaneError


@dataclass
class ServeResult:
    name: str
    url: str
    model_ids: list[str]
    auth: str
    ray_address: str
    ready_seconds: float
    served_seconds: float | None = None
    ok: bool = True
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("config")
        return d


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log(msg: str, keep: bool = False) -> None:
    from runtime.progress import note

    note("serve", msg, keep=keep)


def start_serving(spec, *, address: str | None = None, port: int | None = None, host: str | None = None,
                  timeout_s: float = 900.0) -> ServeResult:
    """Deploy ``spec`` and return when its endpoint is ready (Serve keeps running).

    ``port=0`` picks a free port. Ray stays connected; ``stop_serving(result)`` removes the app.
    """
    from runtime.ray_env import init_ray
    from runtime.serving.guard import load_api_keys

    if spec.auth == "api-key":
        load_api_keys()  # refuse before starting anything: an api-key endpoint never serves openly
    host = host or spec.host
    port = spec.port if port is None else (port or free_port(host))
    info = init_ray(address)
    from ray import serve

    from runtime.serving.app import build_app

    t0 = time.perf_counter()
    app = build_app(spec)
    serve.start(http_options={"host": host, "port": port})
    _log(f"deploying {spec.name!r} (model {spec.model}); the engine takes ~30 s to load on CPU")
    try:
        serve.run(app, name=spec.name, route_prefix="/", blocking=False)
        _wait_ready(spec.name, timeout_s)
    except RaylaneError:
        raise
    except Exception as e:  # Serve reports a failed deploy as RuntimeError with the replica's log
        raise RaylaneError(
            f"serving {spec.name!r} failed to start: {_first_line(e)}",
            hint="check the replica logs (ray dashboard or /tmp/ray/session_latest/logs/serve)",
        ) from None
    actual = _bound_port(port)
    model = spec.served_model_id
    ids = [model] + [f"{model}:{a}" for a in spec.adapters]
    url = f"http://{host}:{actual}"
    _log(f"ready: {url}/v1 (models: {', '.join(ids)}; auth: {spec.auth})", keep=True)
    return ServeResult(spec.name, url, ids, spec.auth, info.address, round(time.perf_counter() - t0, 1))


def stop_serving(result: ServeResult) -> None:
    from ray import serve

    serve.delete(result.name)


def run_serving(spec, *, address: str | None = None, port: int | None = None, block: bool = True,
                **_: Any) -> ServeResult:
    """``raylane run`` for OnlineInference: serve until Ctrl-C (``block=False`` returns when ready)."""
    result = start_serving(spec, address=address, port=port)
    if not block:
        return result
    t0 = time.perf_counter()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        _log("interrupted; shutting down")
    finally:
        from ray import serve

        serve.shutdown()
    result.served_seconds = round(time.perf_counter() - t0, 1)
    return result


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "Error" in line or "error" in line:
            return line.strip()[:500]
    return text.splitlines()[0][:500] if text else type(e).__name__


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


def _clean(msg: str) -> str:
    """A Serve failure message without the Python traceback it wraps."""
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln and not ln.startswith(" "):
            return ln.strip()[:800]
    return (lines[-1] if lines else msg)[:800]


def _bound_port(requested: int) -> int:
    return requested
