"""Capacity planning: weights, KV cache, GPU fit, load time and replica counts; for agents
(``plan(agent=...)``), LLM load, replicas, session actors and the session store
(``runtime.planning_agents``).

>>> from runtime.planning import plan
>>> plan(params=7e9, dtype="fp16").weights_gb_si
14.0
>>> plan(agent={"sessions_per_s": 1, "steps_per_session": 2, "prompt_tokens": 500, "output_tokens": 20}).llm_tokens_per_s
1060.0

Sizes: ``*_gb`` are in the GPU world's gigabytes, GiB (2**30 bytes: what GPU memory and
``nvidia-smi`` report), so they compare directly with a GPU's memory; ``*_gb_si`` are decimal
(1e9 bytes). A 7B model in fp16 is 14.0 GB SI = 13.0 GiB; 70B is 140 GB SI = 130.4 GiB.
Load time uses the decimal rate a storage system quotes (5 GB/s = 5e9 bytes/s).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from runtime.errors import UsageError

BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}

# GPU memory per SKU, in GiB as the device reports it.
GPU_MEMORY_GIB = {
    "L4": 24,
    "A10G": 24,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H200-141GB": 141,
}
GPU_ALIASES = {"A100": "A100-80GB", "H100": "H100-80GB", "H200": "H200-141GB", "L4-24GB": "L4", "A10G-24GB": "A10G"}

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class CapacityPlan:
    params: float
    dtype: str
    weights_bytes: float
    weights_gb: float
    weights_gb_si: float
    kv_cache_bytes: float
    kv_cache_gb: float
    kv_cache_gb_si: float
    total_gb: float
    gpu: str
    gpu_memory_gb: float
    usable_gb: float
    fits: bool
    min_gpus: int
    load_gbps: float
    load_seconds: float
    peak_replicas: int | None
    steady_replicas: int | None
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_gpu(name: str) -> str:
    key = name.strip().upper().replace("_", "-")
    for sku in GPU_MEMORY_GIB:
        if key == sku.upper():
            return sku
    if key in GPU_ALIASES:
        return GPU_ALIASES[key]
    raise UsageError(
        f"unknown GPU {name!r}",
        hint=f"use one of {', '.join(GPU_MEMORY_GIB)} (or A100, H100, H200)",
    )


def plan(
    params: float | None = None,
    dtype: str = "fp16",
    *,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str | None = None,
    gpu: str = "H100-80GB",
    memory_utilization: float = 0.9,
    load_gbps: float = 5.0,
    concurrent_streams: int | None = None,
    streams_per_replica: float | None = None,
    peak_to_average: float = 1.0,
    headroom: float = 1.5,
    agent: dict | None = None,
):
    """Size a model deployment (a ``CapacityPlan``). KV cache needs layers, kv_heads and head_dim
    (else it is 0). With ``agent`` (an agent profile: ``runtime.planning_agents.AgentProfile``
    fields), size an agent deployment instead (an ``AgentPlan``)."""
    if agent is not None:
        if params is not None:
            raise UsageError("plan either a model (--params) or an agent (--agent), not both",
                             hint="run raylane plan twice: the agent plan's replica count uses your model's throughput")
        from runtime.planning_agents import plan_agent

        return plan_agent(agent)
    if params is None:
        raise UsageError("--params is required (or --agent for an agent profile)", hint="e.g. --params 7e9")
    if params <= 0:
        raise UsageError("--params must be positive", hint="e.g. --params 7e9")
    if dtype not in BYTES_PER_PARAM:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(BYTES_PER_PARAM)}")
    kv_dtype = kv_dtype or dtype
    if kv_dtype not in BYTES_PER_PARAM:
        raise UsageError(f"unknown kv dtype {kv_dtype!r}", hint=f"use one of {', '.join(BYTES_PER_PARAM)}")
    if not 0 < memory_utilization <= 1:
        raise UsageError("--memory-utilization must be in (0, 1]")
    if load_gbps <= 0:
        raise UsageError("--load-gbps must be positive")
    sku = normalize_gpu(gpu)
    notes: list[str] = []

    weights = params * BYTES_PER_PARAM[dtype]
    kv = 0.0
    if layers and kv_heads and head_dim:
        kv = batch * context * layers * kv_heads * head_dim * 2 * BYTES_PER_PARAM[kv_dtype]
    else:
        notes.append("KV cache not sized: pass --layers, --kv-heads and --head-dim")
    mem = GPU_MEMORY_GIB[sku]
    usable = mem * memory_utilization
    total_gib = (weights + kv) / GIB
    min_gpus = max(1, math.ceil(total_gib / usable))
    if min_gpus > 1:
        notes.append(f"needs tensor parallelism over {min_gpus} x {sku} (or a smaller dtype)")

    peak = steady = None
    if concurrent_streams is not None:
        if not streams_per_replica or streams_per_replica <= 0:
            raise UsageError("--concurrent-streams needs --streams-per-replica > 0")
        if peak_to_average < 1:
            raise UsageError("--peak-to-average must be >= 1")
        peak = math.ceil(concurrent_streams / streams_per_replica)
        steady = max(1, math.ceil(peak / peak_to_average * headroom))

    return CapacityPlan(
        params=params,
        dtype=dtype,
        weights_bytes=weights,
        weights_gb=round(weights / GIB, 3),
        weights_gb_si=round(weights / GB, 3),
        kv_cache_bytes=kv,
        kv_cache_gb=round(kv / GIB, 3),
        kv_cache_gb_si=round(kv / GB, 3),
        total_gb=round(total_gib, 3),
        gpu=sku,
        gpu_memory_gb=mem,
        usable_gb=round(usable, 2),
        fits=total_gib <= usable,
        min_gpus=min_gpus,
        load_gbps=load_gbps,
        load_seconds=round(weights / (load_gbps * GB), 2),
        peak_replicas=peak,
        steady_replicas=steady,
        notes=notes,
    )
