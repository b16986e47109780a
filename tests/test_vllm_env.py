"""raylane's vLLM plugin: registered where vLLM looks for general plugins, and it grants AMX."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

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
