"""Batch inference throughput: raylane vs bare vLLM vs a plain ``ray.data.llm`` processor.

    python -m bench.batch                     # 4096 prompts x 64 tokens on the tiny model
    python -m bench.batch --prompts 1024 --max-tokens 32

All three run in one process, one after another, on the same prompts, model and sampling
(greedy, ``ignore_eos`` so every row generates exactly ``--max-tokens``). Each reports tokens/s
with engine start-up included and in steady state (from the first output to the last):

- bare ``vllm.LLM.generate`` on all prompts at once (steady = the generate call);
- a plain ``ray.data.llm`` processor as its docs show it (separate tokenize and detokenize
  stages, ``detokenize=False`` in the engine);
- ``raylane`` (``run_batch``): reads and tokenizes in workers (prepare actors), engine stage, shard
  commits from a writer actor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prompts(n: int) -> list[str]:
    from runtime.batch.corpus import TOPICS, sample_corpus

    rows = sample_corpus(n, seed=3)
    return [r["prompt"] if r["prompt"] and len(r["prompt"]) < 200 else f"Explain {TOPICS[i % 10]} briefly."
            for i, r in enumerate(rows)]


def bench_bare(model: str, prompts: list[str], max_tokens: int, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, max_model_len=max_model_len, enforce_eager=True, seed=0, disable_log_stats=True)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    gc.collect()
    return dict(name="bare vllm.LLM.generate", tokens=tokens, startup_s=t1 - t0, total_s=t2 - t0, steady_s=t2 - t1)


def bench_plain_processor(model: str, prompts: list[str], max_tokens: int, max_model_len: int,
                          batch_size: int) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=dict(max_model_len=max_model_len, enforce_eager=True, disable_log_stats=True),
        batch_size=batch_size,
        concurrency=1,
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}},
        chat_template_stage=False,
        tokenize_stage=True,
        detokenize_stage=True,
        log_engine_metrics=False,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=dict(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)),
        postprocess=lambda row: dict(text=row["generated_text"], n=row["num_generated_tokens"]),
    )
    t0 = time.perf_counter()
    ds = processor(ray.data.from_items([{"prompt": p} for p in prompts]))
    tokens = first_tokens = 0
    t_first = None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n = sum(batch.column("n").to_pylist())
        if t_first is None:
            t_first, first_tokens = time.perf_counter(), n
        tokens += n
    t2 = time.perf_counter()
    return dict(name="plain ray.data.llm processor", tokens=tokens, startup_s=t_first - t0, total_s=t2 - t0,
                steady_s=t2 - t_first, steady_tokens=tokens - first_tokens)


def bench_raylane(model: str, prompts: list[str], max_tokens: int, max_model_len: int, batch_size: int,
                  workdir: Path) -> dict:
    from runtime.batch import run_batch
    from runtime.batch import shards as sh
    from runtime.specs import parse_spec

    corpus = workdir / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    spec = parse_spec({
        "kind": "BatchInference", "name": "bench", "model": model,
        "input": {"path": str(corpus)}, "output": {"path": str(workdir / "out"), "format": "parquet"},
        "sampling": {"max_tokens": max_tokens, "ignore_eos": True},
        "rows_per_shard": max(1, len(prompts) // 16), "max_model_len": max_model_len,
        "batch_size": batch_size, "storage": {"root": str(workdir)},
    })
    t0 = time.time()
    result = run_batch(spec)
    t2 = time.time()
    assert result.ok, result.problems
    commits = sorted(sh.read_commits(spec.output_path()).values(), key=lambda c: c.committed_at)
    first = commits[0]
    return dict(name="raylane run_batch", tokens=result.output_tokens, startup_s=first.committed_at - t0,
                total_s=t2 - t0, steady_s=commits[-1].committed_at - first.committed_at,
                steady_tokens=result.output_tokens - first.output_tokens)


def _with_load(fn, *args) -> dict:
    """Run one contender and note the 1-minute load average around it: on a shared machine the
    ratios only mean something when the loads are alike."""
    before = os.getloadavg()[0]
    r = fn(*args)
    r["load"] = (before + os.getloadavg()[0]) / 2
    return r


def _row(r: dict, bare: dict) -> str:
    steady = r.get("steady_tokens", r["tokens"]) / r["steady_s"]
    total = r["tokens"] / r["total_s"]
    bare_steady = bare["tokens"] / bare["steady_s"]
    bare_total = bare["tokens"] / bare["total_s"]
    return (f"| {r['name']} | {r['tokens']} | {r['startup_s']:.1f} | {total:,.0f} | {total / bare_total:.2f}x "
            f"| {steady:,.0f} | {steady / bare_steady:.2f}x | {r['load']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default=None, help="model folder; default raylane's tiny model")
    p.add_argument("--only", choices=["bare", "plain", "raylane"], action="append")
    args = p.parse_args(argv)

    from runtime.ray_env import ray_session
    from runtime.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    model = args.model or str(write_tiny_model(work / "tiny-llama", seed=0))
    prompts = _prompts(args.prompts)
    only = set(args.only or ["bare", "plain", "raylane"])
    results = []
    # vLLM and Ray print to stdout (fd 1, also from child processes): keep it for the table.
    sys.stdout.flush()
    table_fd = os.dup(1)
    os.dup2(2, 1)
    if "bare" in only:
        print("[bench] bare vLLM ...", file=sys.stderr, flush=True)
        results.append(_with_load(bench_bare, model, prompts, args.max_tokens, args.max_model_len))
    with ray_session(None):
        if "plain" in only:
            print("[bench] plain ray.data.llm processor ...", file=sys.stderr, flush=True)
            results.append(_with_load(bench_plain_processor, model, prompts, args.max_tokens,
                                      args.max_model_len, args.batch_size))
        if "raylane" in only:
            print("[bench] raylane run_batch ...", file=sys.stderr, flush=True)
            results.append(_with_load(bench_raylane, model, prompts, args.max_tokens, args.max_model_len,
                                      args.batch_size, work))
    sys.stdout.flush()
    os.dup2(table_fd, 1)
    bare = results[0]
    print(f"\n{args.prompts} prompts x {args.max_tokens} tokens, tiny Llama, {os.cpu_count()} cores "
          f"(ratios vs {bare['name']})\n")
    print("| engine | tokens | start-up s | tok/s incl. start-up | ratio | tok/s steady | ratio | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(_row(r, bare))
    print()
    print(json.dumps(results, indent=None, default=float), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
