"""The quickstart's batch stage: the sample corpus through the fine-tuned adapter (or the base
model when no adapter stage ran), then a verify of the output."""

from __future__ import annotations

from runtime.batch import run_batch, verify_output
from runtime.batch.corpus import write_corpus
from runtime.errors import RaylaneError
from runtime.specs import parse_spec


def stage_batch(ctx) -> dict:
    """``ctx`` is ``runtime.quickstart.QuickstartContext``; returns what the stage did."""
    corpus = write_corpus(ctx.workdir / "batch" / "corpus.jsonl", n=200)
    spec = parse_spec({
        "kind": "BatchInference",
        "name": "quickstart-batch",
        "model": str(ctx.model_dir),
        "adapter": str(ctx.adapter_dir) if ctx.adapter_dir else None,
        "input": {"path": str(corpus)},
        "output": {"path": str(ctx.workdir / "batch" / "output"), "format": "jsonl"},
        "sampling": {"max_tokens": 16},
        "rows_per_shard": 50,
        "max_prompt_tokens": 256,
        "max_model_len": 512,
        "storage": {"root": str(ctx.workdir)},
    })
    result = run_batch(spec)
    report = verify_output(result.output)
    if not (result.ok and report.ok):
        raise RaylaneError(f"batch output incomplete: {report.problems[:3]}",
                           hint=f"raylane batch verify {result.output}")
    return {"adapter": spec.adapter, "rows_in": result.rows_in, "rows_out": result.rows_out,
            "rows_error": result.rows_error, "shards_total": result.shards_total,
            "shards_skipped": result.shards_skipped, "verified": report.ok, "output": result.output,
            "manifest": result.manifest, "tokens_per_s": result.tokens_per_s,
            "rows_per_s": round(result.rows_in / result.seconds, 1) if result.seconds else 0.0}
