"""From an ``OnlineInference`` spec to Ray Serve configuration: one source of truth for
``raylane run``, ``serve run``, ``serve deploy`` and KubeRay's RayService ``serveConfigV2``.

>>> from runtime.specs import parse_spec
>>> spec = parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none"})
>>> build_serve_config(spec)["applications"][0]["import_path"]
'serve_apps.serve:build_serve_app'

Nothing here imports Ray or vLLM: ``raylane render`` must stay fast and GPU-free.
"""

from __future__ import annotations

from typing import Any

from runtime.serving.autoscaling import autoscaling_config
from runtime.specs import dump_spec
from runtime.vllm_env import engine_env as env_of_engine

# Engine replica health: Serve restarts a replica whose check_health fails this long.
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0


def build_serve_config(spec) -> dict[str, Any]:
    """The dict ``serve deploy`` accepts (and RayService ``serveConfigV2`` embeds).

    The application references an import path and carries the spec itself as ``args``, so the
    cluster rebuilds exactly this app from the spec; nothing local is pickled into it.
    """
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": spec.port},
        "applications": [
            {
                "name": spec.name,
                "route_prefix": "/",
                "import_path": spec.shape.serve_app,
                "args": {"spec": dump_spec(spec)},
            }
        ],
    }


def placement(spec) -> dict[str, Any]:
    """Placement-group bundles for one engine replica: one bundle per tensor-parallel rank."""
    r = spec.resources
    if r.uses_gpu:
        bundle: dict[str, float] = {"GPU": r.gpus_per_worker, "CPU": r.cpus_per_worker}
    else:
        bundle = {"CPU": r.cpus_per_worker}
    strategy = spec.placement_strategy or ("STRICT_PACK" if spec.tensor_parallel_size > 1 else "PACK")
    return {"bundles": [dict(bundle) for _ in range(spec.tensor_parallel_size)], "strategy": strategy}


def engine_kwargs(spec) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "max_model_len": spec.max_model_len,
        "dtype": spec.dtype,
        "max_num_seqs": spec.max_num_seqs,
        "enable_prefix_caching": spec.enable_prefix_caching,
        "tensor_parallel_size": spec.tensor_parallel_size,
        # Engine stats feed the autoscaler and the Prometheus histograms (TTFT, TPOT, e2e).
        "disable_log_stats": False,
    }
    if spec.resources.uses_gpu:
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization
    else:
        kw["enforce_eager"] = True  # no CUDA graphs on CPU
    if spec.adapters:
        kw.update(enable_lora=True, max_lora_rank=spec.max_lora_rank, max_loras=spec.max_adapters_per_replica)
    if spec.tool_calling is not None:
        # Frontend options: ray.serve.llm routes them to vLLM's OpenAI serving layer (FrontendArgs).
        kw.update(enable_auto_tool_choice=True, tool_call_parser=spec.tool_calling.parser)
    kw.update(spec.engine_kwargs)
    return kw


def engine_env(spec) -> dict[str, str]:
    return env_of_engine(spec.resources.uses_gpu)


def llm_config(spec, model_source: str) -> dict[str, Any]:
    """Keyword arguments for ``ray.serve.llm.LLMConfig`` (a plain dict: no Ray import here)."""
    cfg: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.served_model_id, "model_source": model_source},
        "engine_kwargs": engine_kwargs(spec),
        "placement_group_config": placement(spec),
        "runtime_env": {"env_vars": engine_env(spec)},
        "log_engine_metrics": True,
        "server_cls": "runtime.serving.app:RaylaneLLMServer",
        "deployment_config": {
            "autoscaling_config": autoscaling_config(spec),
            # The engine batches internally; admit more than max_num_seqs so requests queue in
            # vLLM (visible to the autoscaler as num_requests_waiting) rather than at handles.
            "max_ongoing_requests": spec.max_num_seqs * 4,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
            # The replica actor only relays; vLLM's engine process does the compute in the
            # placement-group bundle, so the actor takes no CPU of its own.
            "ray_actor_options": {"num_cpus": 0},
        },
        "experimental_configs": {"stream_batching_interval_ms": spec.stream_batching_interval_ms},
    }
    if spec.resources.accelerator_type:
        cfg["accelerator_type"] = spec.resources.accelerator_type
    if spec.adapters:
        # No dynamic_lora_loading_path: raylane's AdapterLoader resolves spec.adapters instead.
        cfg["lora_config"] = {"max_num_adapters_per_replica": spec.max_adapters_per_replica}
    return cfg

