"""Run an ``OnlineInference`` spec: start Serve on the Ray cluster, deploy the app, serve until
interrupted (``raylane run``), or return once it is ready (``start_serving``, for notebooks/tests).

>>> from runtime.specs import load_spec
>>> from runtime.serving import start_serving
>>> handle = start_serving(load_spec("examples/serve.yaml"), port=0)   # doctest: +SKIP
>>> handle.url                                                          # doctest: +SKIP
'http://127.0.0.1:41231'
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.log import logger
from runtime.ray_env import init_ray, resolve_address
from runtime.serving.deploy import (
    ALL_INTERFACES,
    bind_host,
    cluster_shape,
    deploy,
    free_port,
    serve_until_interrupted,
)
from runtime.serving.keys import load_api_keys


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


_log = logger("serve")


def start_serving(spec, *, address: str | None = None, port: int | None = None, host: str | None = None,
                  timeout_s: float = 900.0) -> ServeResult:
    """Deploy ``spec`` and return when its endpoint is ready (Serve keeps running).

    ``port=0`` picks a free port. Ray stays connected; ``stop_serving(result)`` removes the app.
    Deploys exactly the applications of ``build_serve_config(spec)`` (what ``serve deploy`` and a
    RayService get); only the proxy's host and port are local choices.
    """
    if spec.auth == "api-key":
        load_api_keys()  # refuse before starting anything: an api-key endpoint never serves openly
    info = init_ray(address)
    host, url_host = serving_host(host or spec.host, address, spec.auth)
    port = spec.port if port is None else (port or free_port(host))
    t0 = time.perf_counter()
    config = spec.shape.serve_config(spec)
    _log(f"deploying {spec.name!r} (model {spec.model}); the engine takes ~30 s to load on CPU")
    deploy(config, host=host, port=port, timeout_s=timeout_s)
    url = f"http://{url_host}:{port}"
    ids = spec.served_model_ids
    _log(f"ready: {url}/v1 (models: {', '.join(ids)}; auth: {spec.auth})", keep=True)
    return ServeResult(spec.name, url, ids, spec.auth, info.address, round(time.perf_counter() - t0, 1),
                       config=config)


def serving_host(host: str, address: str | None, auth: str) -> tuple[str, str]:
    """(the host Serve binds, the host the printed URL names) on the connected cluster; says so
    when a multi-node or remote cluster needs every interface (``bind_host``)."""
    nodes, head_ip = cluster_shape()
    bound, note = bind_host(host, remote=resolve_address(address) is not None, nodes=nodes, auth=auth)
    if note:
        _log(note, keep=True)
    # Bound on every interface: the URL names the head (the proxy a client reaches first).
    return bound, (head_ip or "127.0.0.1") if bound == ALL_INTERFACES else bound


def stop_serving(result: ServeResult) -> None:
    from ray import serve

    serve.delete(result.name)


def run_serving(spec, *, address: str | None = None, port: int | None = None, block: bool = True,
                **_: Any) -> ServeResult:
    """``raylane run`` for OnlineInference: serve until Ctrl-C (``block=False`` returns when ready)."""
    result = start_serving(spec, address=address, port=port)
    if not block:
        return result
    result.served_seconds = serve_until_interrupted(_log)
    return result
