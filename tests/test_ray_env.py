"""Ray bootstrap: address resolution and a clear error for an unreachable cluster."""

import os
import socket
import time

import pytest

from runtime.errors import ClusterUnreachable
from runtime.ray_env import check_reachable, resolve_address
from tests.conftest import run_cli


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    assert resolve_address("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == "10.0.0.1:6379"
    assert resolve_address("ray://h:10001") == "ray://h:10001"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_address_fails_fast_with_hint():
    port = _closed_port()
    t = time.monotonic()
    with pytest.raises(ClusterUnreachable) as e:
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - t < 5
    assert f"127.0.0.1:{port}" in str(e.value)
    assert "hint:" in str(e.value)  # says what to do next


def test_cli_run_against_unreachable_cluster_exits_3(tmp_path):
    port = _closed_port()
    from runtime.ray_env import init_ray

    with pytest.raises(ClusterUnreachable, match="cannot reach the Ray cluster"):
        init_ray(f"127.0.0.1:{port}")
    r = run_cli("quickstart", "--address", f"127.0.0.1:{port}", "--workdir", str(tmp_path))
    assert r.returncode == 3, r.stderr
    assert "cannot reach the Ray cluster" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.ray
def test_local_cluster_has_enough_cpus_for_serve_llm(ray_local):
    assert ray_local.local and ray_local.num_cpus >= 4


def test_local_cluster_gives_haproxy_free_ports(ray_local):
    """HAProxy's stats and metrics listeners default to fixed ports, so a second local cluster on
    the machine could not start its HAProxy; the cluster's workers see the free ones chosen here."""

    import ray

    from runtime.ray_env import HAPROXY_PORT_ENV

    seen = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in HAPROXY_PORT_ENV}).options(num_cpus=0).remote())
    assert seen == {k: os.environ[k] for k in HAPROXY_PORT_ENV}
    assert {int(v) for v in seen.values()}.isdisjoint({8404, 9101})
