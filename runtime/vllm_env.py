"""Environment for vLLM engines that raylane starts in Ray workers, and for the clusters that
serve them (``SERVE_CLUSTER_ENV``)."""

from __future__ import annotations

import os

# Ray starts worker processes at nice 15 (its `worker_niceness`), and vLLM's engine processes
# inherit it from the actor that starts them. The engine is the one process that must not yield:
# at nice 15 any nice-0 process (Ray Data tasks, the driver, HAProxy) takes the core it is bound
# to. Ray reads this variable when a worker starts; 0 is the raylet's own priority, so no
# privilege is needed.
ENGINE_PRIORITY_ENV = {"RAY_worker_niceness": "0"}

# The request path of a raylane serving app, told once here (the README points to it): each
# engine replica is itself the HTTP ingress (vLLM's OpenAI app behind raylane's guard, see
# runtime.serving.app), and Serve's HAProxy on every node forwards each connection straight to a
# replica's own port, so no Ray hop sits between the client and vLLM. The HAProxy binary ships
# with ray[serve] on Linux. Every node of a cluster that serves raylane apps needs this variable:
# local clusters get it from runtime.ray_env (an explicit RAY_SERVE_ENABLE_HA_PROXY=0 keeps
# Serve's Python proxy, which forwards to the same app), KubeRay pods from cluster/render.py.
SERVE_CLUSTER_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def engine_env(use_gpu: bool) -> dict[str, str]:
    """Environment of an engine worker (batch stage actor or serving replica) and the vLLM
    processes it starts: normal CPU priority; on CPU, a KV cache of $VLLM_CPU_KVCACHE_SPACE GiB
    or 1 (vLLM CPU reserves several GiB by default; the tiny model needs little)."""
    env = dict(ENGINE_PRIORITY_ENV)
    if not use_gpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def engine_runtime_env(use_gpu: bool) -> dict:
    """The Ray runtime_env for an engine worker (see ``engine_env``)."""
    return {"env_vars": engine_env(use_gpu)}


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
