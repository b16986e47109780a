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
