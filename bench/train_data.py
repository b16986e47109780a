"""Training data that scales: per-worker peak memory and start-up time against corpus size.

    python -m bench train-data [--tokens 1000000 50000000] [--workers 2] [--corpus-dir DIR]

For each corpus (synthetic support-ticket text, jsonl, about the given number of tiny-tokenizer
tokens) it runs a short Training spec twice on a local Ray cluster: the first run tokenizes and
packs the corpus into token shards with Ray Data; the second reuses them. Each worker records
its peak RSS and when it computed its first batch. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

STEPS = 4
WORDS = ("router laptop camera headset monitor keyboard printer phone ticket support refund shipping cable "
         "firmware update please restart error noise arrived late missing the a for is on your we").split()


def write_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """~``tokens`` tiny-tokenizer tokens of jsonl text (about 1.5 characters a token); returns the
    bytes. An existing file is kept (``--corpus-dir``: write the corpora once, bench many times)."""
    if path.is_file():
        return path.stat().st_size
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    target = int(tokens * 1.56)
    written = 0
    with open(path, "w") as f:
        i = 0
        while written < target:
            line = json.dumps({"text": f"Ticket {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return path.stat().st_size


def measured_loss(model, batch, step):
    """``train.step_fn``: the causal-LM loss; on the first step each rank records when it got its
    first batch and, every step, its peak RSS (``<run dir>/bench/rank-N.json``)."""
    import resource

    import ray.train

    ctx = ray.train.get_context()
    folder = os.path.join(ctx.get_storage().experiment_fs_path, "bench")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank-{ctx.get_world_rank()}.json")
    rec = {}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    rec.setdefault("first_batch", time.time())
    rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(path, "w") as f:
        json.dump(rec, f)
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def spec_dict(root: str, name: str, corpus: Path, workers: int) -> dict:
    return {
        "kind": "Training", "name": name, "storage": {"root": root},
        "data": {"path": str(corpus), "max_seq_len": 512, "eval_fraction": 0.001},
        "train": {"steps": STEPS, "batch_size": 2, "checkpoint_every_n_steps": STEPS, "step_fn": "bench.train_data:measured_loss"},
        "resources": {"num_workers": workers, "cpus_per_worker": 0.5},
        "registry": {"enabled": False},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 50_000_000])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--corpus-dir", default=None, help="where the corpora are written (and kept); default: the run's temp dir")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from runtime.ray_env import ray_session
    from runtime.specs import parse_spec
    from runtime.training import run_training

    root = tempfile.mkdtemp(prefix="raylane-bench-train-data-")
    rows = []
    with ray_session():
        for n in args.tokens:
            corpus = Path(args.corpus_dir or root) / f"corpus-{n}.jsonl"
            size = write_corpus(corpus, n)
            for attempt in ("first run", "second run"):
                name = f"c{n}-{attempt.split()[0]}"
                t0 = time.time()
                r = run_training(parse_spec(spec_dict(root, name, corpus, args.workers)))
                ranks = [json.loads(f.read_text()) for f in sorted((Path(root) / "runs" / name / "bench").glob("*.json"))]
                rows.append({"tokens": r.data["tokens"], "mb": size / 2**20, "run": attempt, "built": r.data["built"],
                             "prep_s": r.data["seconds"], "sequences": r.data["train_sequences"],
                             "first_batch_s": max(x["first_batch"] for x in ranks) - t0,
                             "rss_mb": max(x["peak_rss_mb"] for x in ranks)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nTraining data: token shards (Ray Data tokenize + pack once, memory-mapped by {args.workers} workers); "
          f"tiny Llama, 512-token sequences, batch 2, {STEPS} steps\n")
    print("| corpus | run | token shards | data prep | run start to first batch (all ranks) | peak RSS per worker |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        how = "built" if x["built"] else "reused"
        print(f"| {x['tokens'] / 1e6:.1f}M tokens ({x['mb']:.0f} MB jsonl, {x['sequences']} sequences) | {x['run']} | "
              f"{how} | {x['prep_s']:.1f} s | {x['first_batch_s']:.1f} s | {x['rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
