"""Environment for vLLM engines that raylane starts in Ray workers, and for the clusters that
serve them (``SERVE_CLUSTER_ENV``); raylane's two vLLM general plugins (AMX permission, and
engine processes that die with their host)."""

from __future__ import annotations

import os
import signal
import threading
import time

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
#
# HAProxy's retry policy: Serve's default retries only a failed connect, so a request in flight on
# a replica whose node dies ends as a dropped connection or as HAProxy's own 502, which Serve's
# fixed error file turns into a bare 500 (ray.serve._private.haproxy writes it; no setting changes
# it). With "empty-response" (the replica closed the connection before any response byte) and
# "503" (the guard's "engine died, retry") HAProxy re-sends the request to another replica
# (`option redispatch`, up to 3 times), so the client usually gets the answer instead (README,
# multi-node figures: some still see a dropped connection). Safe for inference:
# a lost generation has no side effect; an agent turn re-sent to another replica reloads its
# session, whose side-effecting tool calls are recorded per idempotency key (README,
# "exactly-once side effects"), so the retry never repeats an effect that was recorded. A response
# already started (a stream after its 200 header) cannot be retried.
SERVE_CLUSTER_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                     "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response 503"}


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


# How often an engine process checks that the process that started it is still there.
PARENT_POLL_S = 1.0
_watched_pid: int | None = None  # the process whose watcher thread runs (none after a fork)
_fork_hooked = False


def die_with_parent() -> None:
    """A vLLM general plugin (see pyproject.toml): no vLLM engine or worker process outlives the
    process that started it.

    vLLM runs its engine core and workers as multiprocessing children of the process that hosts
    the engine (a Serve replica, a batch stage actor, an API server). When that host dies abruptly
    (SIGKILL, the OOM killer, ``ray stop --force``) nothing tells them: they were measured running
    as orphans for 15-20 minutes, about 2.7 GB each pair, and on a GPU node they would hold the
    GPU's memory so the replacement replica cannot start. Each such child watches its parent and
    kills itself (and so, in turn, its own children) within ``PARENT_POLL_S`` of losing it. vLLM
    loads general plugins in every process it spawns; a forked child inherits the loaded flag
    instead, so the host registers a fork hook that starts the watcher in each forked child. The
    host itself (not a multiprocessing child) is left alone.
    """
    global _fork_hooked
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        _watch_parent()
    if not _fork_hooked:
        _fork_hooked = True
        os.register_at_fork(after_in_child=_watch_parent)


def _watch_parent() -> None:
    global _watched_pid
    me = os.getpid()
    if _watched_pid == me:
        return
    _watched_pid = me
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(me, signal.SIGKILL)  # the host is gone: free the memory (and GPU) now

    threading.Thread(target=watch, name="raylane-parent-watch", daemon=True).start()
