"""raylane plan: weights, KV cache, GPU fit, load time and replicas for a model; or, with
--agent, LLM load, replicas, session actors and store load for an agent."""

from __future__ import annotations

from pathlib import Path

import yaml

from raylane.commands._common import add_json
from raylane.output import json_stdout
from runtime.errors import UsageError
from runtime.planning import plan


def register(sub) -> None:
    p = sub.add_parser("plan", help="capacity plan: memory, GPU fit, load time, replicas (--agent: an agent's load)")
    p.add_argument("--params", type=float, help="parameter count, e.g. 7e9")
    p.add_argument("--agent", nargs="+", metavar="PROFILE.yaml|FIELD=VALUE",
                   help="plan an agent from its traffic profile: a YAML file and/or FIELD=VALUE pairs (later wins), "
                   "e.g. --agent sessions_per_s=2 steps_per_session=3 prompt_tokens=1000 output_tokens=50")
    p.add_argument("--dtype", default="fp16", help="fp32, fp16, bf16, fp8, int8, int4 (default fp16)")
    p.add_argument("--layers", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences in the KV cache (default 1)")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--gpu", default="H100-80GB", help="L4, A10G, A100-40GB, A100-80GB, H100-80GB, H200-141GB")
    p.add_argument("--memory-utilization", type=float, default=0.9, help="usable share of GPU memory (0.9)")
    p.add_argument("--load-gbps", type=float, default=5.0, help="storage read throughput in GB/s (default 5)")
    p.add_argument("--concurrent-streams", type=int)
    p.add_argument("--streams-per-replica", type=float)
    p.add_argument("--peak-to-average", type=float, default=1.0)
    p.add_argument("--headroom", type=float, default=1.5)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.agent is not None:
        if args.params is not None:
            raise UsageError("plan either a model (--params) or an agent (--agent), not both")
        return _run_agent(args)
    r = plan(
        args.params, args.dtype, layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
        context=args.context, batch=args.batch, kv_dtype=args.kv_dtype, gpu=args.gpu,
        memory_utilization=args.memory_utilization, load_gbps=args.load_gbps,
        concurrent_streams=args.concurrent_streams, streams_per_replica=args.streams_per_replica,
        peak_to_average=args.peak_to_average, headroom=args.headroom,
    )
    with json_stdout(args.json) as emit:
        if args.json:
            emit(r)
            return 0
        print(f"weights:   {r.weights_gb:g} GiB ({r.weights_gb_si:g} GB SI) at {r.dtype}")
        print(f"KV cache:  {r.kv_cache_gb:g} GiB ({r.kv_cache_gb_si:g} GB SI)")
        print(f"on {r.gpu} ({r.gpu_memory_gb} GiB, {r.usable_gb} usable): "
              f"{'fits' if r.fits else 'does not fit'}; min GPUs {r.min_gpus}")
        print(f"load time: {r.load_seconds:g} s at {r.load_gbps:g} GB/s")
        if r.peak_replicas is not None:
            print(f"replicas:  peak {r.peak_replicas}, steady {r.steady_replicas}")
        for n in r.notes:
            print(f"note: {n}")
    return 0


def agent_profile(items: list[str]) -> dict:
    """The profile from ``--agent`` items: YAML files (mappings) and FIELD=VALUE pairs, in order."""
    profile: dict = {}
    for item in items:
        if "=" in item:
            key, _, value = item.partition("=")
            try:
                profile[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UsageError(f"--agent {item}: the value is not a number or YAML scalar") from None
            continue
        path = Path(item)
        if not path.is_file():
            raise UsageError(f"--agent {item}: not a file, and not FIELD=VALUE",
                             hint="e.g. --agent profile.yaml sessions_per_s=5")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UsageError(f"--agent {item}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise UsageError(f"--agent {item}: an agent profile is a mapping of fields (sessions_per_s: 2, ...)")
        profile.update(data)
    return profile


def _run_agent(args) -> int:
    r = plan(agent=agent_profile(args.agent))
    with json_stdout(args.json) as emit:
        if args.json:
            emit(r)
            return 0
        print(f"LLM:       {r.llm_tokens_per_s:,.0f} tokens/s ({r.prompt_tokens_per_s:,.0f} prompt + "
              f"{r.output_tokens_per_s:,.0f} output), {r.steps_per_s:g} calls/s, mean prompt "
              f"{r.mean_prompt_tokens:,.0f} tokens, {r.concurrent_llm_calls:g} calls in flight")
        if r.llm_replicas is not None:
            print(f"replicas:  {r.llm_replicas} at {r.replica_utilization:.0%} utilization "
                  f"(prefill {r.prefill_s:.3g} s of a {r.profile['ttft_s']:g} s TTFT target)")
        print(f"sessions:  {r.concurrent_sessions:g} at once ({r.active_sessions:g} in a turn, {r.idle_sessions:g} "
              f"idle); a session lasts {r.session_duration_s:g} s")
        print(f"actors:    {r.session_actors} session actors ({r.orchestration_cores:g} cores of orchestration), "
              f"{r.tool_processes_per_actor} tool processes each, ~{r.actors_memory_mb:,.0f} MB")
        print(f"store:     {r.store_writes_per_s:g} writes/s ({r.store_write_bytes_per_s / 1e6:.3g} MB/s), grows "
              f"{r.store_growth_gb_per_day:.3g} GB/day ({r.session_bytes / 1e3:.3g} kB a session)"
              + (f", {r.store_size_gb:.3g} GB kept" if r.store_size_gb is not None else ""))
        for n in r.notes:
            print(f"note: {n}")
    return 0
