"""Shared fixtures. Tiers: unit (no Ray), integration (local Ray), end-to-end (``slow``: real vLLM,
Ray Train, Ray Serve on the tiny model). Everything runs in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# local_cluster / local_cluster_nodes: a multi-node Ray cluster on this machine (runtime.testing).
pytest_plugins = ["runtime.testing_pytest"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# No hub here (nor on air-gapped clusters); the tiny model is written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("storage")
    os.environ["RAYLANE_STORAGE_ROOT"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny Llama, written once per test session."""
    from runtime.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster (4 logical CPUs) shared by the integration tests of a module."""
    from runtime.ray_env import init_ray, shutdown_ray

    info = init_ray(None)
    yield info
    shutdown_ray()


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_behind():
    """Each module leaves no Ray cluster running in the test process, so the next module's
    subprocesses (raylane run, jobs.*) never share the machine with a forgotten cluster."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """A multinode test starts several raylets: it is slow, so `make test-fast` (-m "not slow") skips
    it and `make test` (CI) runs it. Forgetting the slow mark would put it in the fast tier."""
    unmarked = [i.nodeid for i in items if i.get_closest_marker("multinode") and not i.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"multinode tests must also be marked slow: {', '.join(unmarked)}")


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None):
    """Run the real ``raylane`` CLI in a subprocess (what users and cron jobs do)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "raylane", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back environment variables a fixture changed (``None``: the variable was unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
