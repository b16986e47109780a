"""Attach to Ray, or start a local cluster: the one place raylane calls ``ray.init``.

>>> from runtime.ray_env import ray_session
>>> with ray_session() as info:               # local cluster, >= 4 logical CPUs
...     print(info.address)                   # doctest: +SKIP
>>> with ray_session("10.0.0.5:6379"): ...    # an existing cluster  # doctest: +SKIP

Address resolution: the ``address`` argument, else ``RAY_ADDRESS``, else a new local cluster
(``address="local"``, never a stray cluster that happens to be running on this machine).
Ray 2.60 turns token authentication on for new local clusters and writes the token to
``~/.ray/auth_token``; raylane keeps that default (``RAY_AUTH_MODE`` overrides it) and turns an
authentication failure against a remote cluster into a message saying where the token goes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlparse

from runtime.errors import ClusterUnreachable, RaylaneError
from runtime.vllm_env import SERVE_CLUSTER_ENV

# HAProxy's own stats and metrics listeners default to fixed ports (8404, 9101) on 0.0.0.0: a
# second local cluster on the machine (another `raylane run`, tests side by side) could not start
# its HAProxy. Each local cluster gets free ones, unless the user set them.
HAPROXY_PORT_ENV = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
_picked_ports: set[str] = set()


def _pick_haproxy_ports() -> None:
    for var in HAPROXY_PORT_ENV:
        if var in os.environ and var not in _picked_ports:
            continue  # the user's choice
        os.environ[var] = str(free_port(""))  # HAProxy binds every interface
        _picked_ports.add(var)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (``port=0`` in the runners, HAProxy's listeners)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

# Engine bundles, Ray Data stages, the agent ingress and Ray Train workers each reserve logical
# CPUs; with one per core a 2-core laptop cannot place an engine next to anything else.
MIN_LOCAL_CPUS = 4


@dataclass(frozen=True)
class RayInfo:
    address: str
    local: bool  # True when raylane started this cluster (and will stop it)
    dashboard_url: str | None
    num_cpus: float
    num_gpus: float


def resolve_address(address: str | None = None) -> str | None:
    """The address to attach to, or None for a new local cluster."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "", "local"):
        return None
    return address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (instead of Ray's long retry loop) when the head is not listening."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host = parsed.hostname
    port = parsed.port or (10001 if parsed.scheme == "ray" and "://" in address else 6379)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 8265)
    if not host:
        raise ClusterUnreachable(f"Ray address {address!r} has no host", hint="use HOST:PORT, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address} ({host}:{port}): {e.strerror or e}",
            hint="check the head node is up (`ray status --address ...`), or drop --address/RAY_ADDRESS "
            "to start a local cluster",
        ) from None


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    namespace: str | None = "raylane",
    runtime_env: dict | None = None,
    include_dashboard: bool | None = None,
) -> RayInfo:
    """Connect to (or start) Ray once per process; calling it again returns the live connection."""
    import ray

    if ray.is_initialized():
        return _info(local=False)
    target = resolve_address(address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict = {"namespace": namespace, "log_to_driver": True}
    object_store_mb = int(os.environ.get("RAYLANE_OBJECT_STORE_MB", "1024"))
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if target is None:
        # A local cluster's processes inherit this environment; an explicit value wins (see
        # runtime.vllm_env.SERVE_CLUSTER_ENV).
        for k, v in SERVE_CLUSTER_ENV.items():
            os.environ.setdefault(k, v)
        _pick_haproxy_ports()
        cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        # A small object store by default: a laptop shares its memory with vLLM and Ray Train.
        kwargs.update(address="local", num_cpus=cpus, object_store_memory=object_store_mb * 2**20)
        if include_dashboard is not None:
            kwargs["include_dashboard"] = include_dashboard
    else:
        check_reachable(target)
        kwargs["address"] = target
    try:
        ray.init(**kwargs)
    except Exception as e:  # Ray raises many types here; translate the ones users can act on.
        text = str(e)
        if "uthentication" in type(e).__name__ + text:
            raise RaylaneError(
                f"the Ray cluster at {target} requires a token: {text.splitlines()[0]}",
                hint="export RAY_AUTH_TOKEN=<token> (from `ray get-auth-token` on the head) or copy it "
                "to ~/.ray/auth_token",
            ) from None
        if target is not None and isinstance(e, (ConnectionError, TimeoutError)):
            raise ClusterUnreachable(f"could not connect to Ray at {target}: {text}") from None
        raise
    return _info(local=target is None)


def _info(local: bool) -> RayInfo:
    import ray

    ctx = ray.get_runtime_context()
    res = ray.cluster_resources()
    dash = None
    with contextlib.suppress(Exception):
        dash = ray.worker.get_dashboard_url() or None  # type: ignore[attr-defined]
    return RayInfo(
        address=getattr(ctx, "gcs_address", "") or "",
        local=local,
        dashboard_url=f"http://{dash}" if dash and "://" not in dash else dash,
        num_cpus=res.get("CPU", 0.0),
        num_gpus=res.get("GPU", 0.0),
    )


def ray_logs_dir() -> str | None:
    """This Ray session's log folder (every worker's, Serve's and HAProxy's logs), when the
    session's node runs on this machine; None otherwise."""
    import ray

    with contextlib.suppress(Exception):
        node = ray._private.worker._global_node
        if node is not None:
            return node.get_logs_dir_path()
    return None


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None = None, **kwargs) -> Iterator[RayInfo]:
    """``init_ray`` for the duration of a block; shuts down only what it started."""
    import ray

    already = ray.is_initialized()
    info = init_ray(address, **kwargs)
    try:
        yield info
    finally:
        if not already:
            shutdown_ray()
