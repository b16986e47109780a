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


def test_local_clusters_get_their_own_haproxy_ports(monkeypatch):
    from runtime import ray_env

    monkeypatch.setattr(ray_env, "_picked_ports", set())
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's choice is kept
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT", raising=False)
    ray_env._pick_haproxy_ports()
    first = os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404" and int(first) not in (9101, 0)
    ray_env._pick_haproxy_ports()  # the next local cluster of this process re-picks its own
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
