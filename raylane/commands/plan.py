"""raylane plan: weights, KV cache, GPU fit, load time and replicas for a model."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.output import json_stdout
from runtime.planning import plan


def register(sub) -> None:
    p = sub.add_parser("plan", help="capacity plan: memory, GPU fit, load time, replicas")
    p.add_argument("--params", type=float, required=True, help="parameter count, e.g. 7e9")
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
