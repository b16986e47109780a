"""A real ``ray start --head`` node for tests (own temp dir, free ports, Ray 2.60's token auth on),
stopped with every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.ray_env import HAPROXY_PORT_ENV, free_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class Head:
    dashboard_url: str  # what the Jobs API and `ray job submit --address` take
    gcs_address: str  # what ray.init / `serve run --address` take




def _pids_of_session(temp_dir: str) -> set[int]:
    """Processes of this cluster only: their command line names our temp dir (plus their children)."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry.name)] = (ppid, cmd)
    ours = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        ours |= kids
        grew = bool(kids)
    return ours


def stop(temp_dir: str) -> None:
    pids = _pids_of_session(temp_dir)
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.5)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        if not pids:
            return


def head_env() -> dict[str, str]:
    """The environment for processes that use the head: the project's venv on PATH (the job driver
    runs `python -m jobs...` from it, as on a real head image), no inherited RAY_ADDRESS."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Like the local clusters raylane starts: HAProxy's listeners on free ports, not 8404/9101.
    env.update({k: str(free_port("")) for k in HAPROXY_PORT_ENV})
    return env


@contextlib.contextmanager
def ray_head(temp_dir: str, num_cpus: int = 2) -> Iterator[Head]:
    dash, gcs = free_port(), free_port()
    flags = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus", str(num_cpus), "--temp-dir", temp_dir,
           "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--disable-usage-stats", "--object-store-memory", str(256 * 2**20)]
    for flag in flags:
        cmd += [flag, str(free_port())]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=head_env(), timeout=240, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        yield Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}")
    finally:
        stop(temp_dir)
