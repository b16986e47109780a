"""raylane's vLLM plugin: registered where vLLM looks for general plugins, and it grants AMX."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

ARCH_GET_XCOMP_PERM = 0x1022
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86_64


def test_plugin_is_registered_for_vllm():
    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "raylane_cpu_isa"]
    from runtime.vllm_env import request_amx_permission

    assert ep.load() is request_amx_permission


def test_plugin_grants_amx_where_the_cpu_has_it():
    """In a fresh process: after the plugin runs, the kernel reports the AMX tile-data permission
    (when the CPU has AMX; elsewhere the plugin is a no-op and must not fail)."""
    code = f"""
import ctypes, torch
from runtime.vllm_env import request_amx_permission
libc = ctypes.CDLL(None, use_errno=True)
def granted():
    mask = ctypes.c_uint64(0)
    libc.syscall({SYS_ARCH_PRCTL}, {ARCH_GET_XCOMP_PERM}, ctypes.byref(mask))
    return bool(mask.value & (1 << {XFEATURE_XTILEDATA}))
before = granted()
request_amx_permission()
print(torch.cpu._is_amx_tile_supported(), before, granted())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    has_amx, before, after = (w == "True" for w in out.stdout.split())
    assert after == has_amx
    if has_amx:
        assert not before  # nothing grants it by default: without the plugin vLLM's AMX kernels SIGILL


# ---- engine processes die with their host (issue 13 item 7) ----

HOST = """
import multiprocessing as mp, sys, time
from runtime.vllm_env import die_with_parent

def spawned_child():
    die_with_parent()  # what vLLM's plugin loading does in every process it spawns
    time.sleep(120)

def forked_child():
    time.sleep(120)  # plugins are not loaded again after a fork: the host's fork hook watches

if __name__ == "__main__":
    method, plugin = sys.argv[1], sys.argv[2] == "on"
    if plugin:
        die_with_parent()  # the host loads the plugins before it starts the engine
    ctx = mp.get_context(method)
    p = ctx.Process(target=spawned_child if method == "spawn" else forked_child, daemon=False)
    p.start()
    time.sleep(1.5)  # the child's watcher is running
    print(p.pid, flush=True)
    time.sleep(120)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _host_then_kill(tmp_path, method: str, plugin: str) -> int:
    import signal

    script = tmp_path / "host.py"
    script.write_text(HOST)
    host = subprocess.Popen([sys.executable, str(script), method, plugin], stdout=subprocess.PIPE, text=True)
    child = int(host.stdout.readline())
    host.send_signal(signal.SIGKILL)  # as the OOM killer or `ray stop --force` would
    host.wait(timeout=10)
    return child


def test_engine_children_die_with_their_host(tmp_path):
    import time

    for method in ("spawn", "fork"):
        child = _host_then_kill(tmp_path, method, "on")
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(child), f"a {method}ed child outlived its SIGKILLed host"


def test_without_the_plugin_the_child_is_orphaned(tmp_path):
    """The control: what the test above guards against does happen without the plugin."""
    import os
    import signal
    import time

    child = _host_then_kill(tmp_path, "fork", "off")
    try:
        time.sleep(3)
        assert not _gone(child)
    finally:
        os.kill(child, signal.SIGKILL)


ENGINE_HOST = """
import sys, time
from vllm import LLM
if __name__ == "__main__":  # vLLM may spawn its engine processes
    llm = LLM(model=sys.argv[1], max_model_len=256, dtype="float32", enforce_eager=True)
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_vllm_host_leaves_no_engine_process(tmp_path, tiny_model):
    """The real thing: a process hosting a vLLM engine is SIGKILLed; its EngineCore goes too."""
    import signal
    import time

    import psutil

    script = tmp_path / "engine_host.py"
    script.write_text(ENGINE_HOST)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "engine_host.log"
    with log.open("w") as err:
        host = subprocess.Popen([sys.executable, str(script), str(tiny_model)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
    try:
        lines = iter(host.stdout.readline, "")  # vLLM logs to stdout too
        assert any(line.strip() == "ready" for line in lines), log.read_text()[-3000:]
        engines = psutil.Process(host.pid).children(recursive=True)
        assert engines, "vLLM started no engine process under its host"
        host.send_signal(signal.SIGKILL)
        host.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(_gone(p.pid) for p in engines):
            time.sleep(0.5)
        left = [(p.pid, p.name()) for p in engines if not _gone(p.pid)]
        assert not left, f"engine processes outlived their host: {left}"
    finally:
        host.kill()
        for p in engines if "engines" in locals() else []:
            if not _gone(p.pid):
                p.kill()
