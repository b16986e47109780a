"""Training harness vs a plain torch loop: steps/s and checkpoint overhead, in one run.

    python -m bench.train [--steps 300] [--workers 1] [--mlflow]

Same model (raylane's tiny Llama config), same packed data (examples/data/train.jsonl, batch 8 x
128 tokens), same optimiser, 1 worker. Each row runs the plain loop and then the raylane harness (Ray Train v2):
without intermediate checkpoints; with checkpoints every 50 steps (the default) uploaded async
(the default) and sync; and every 10 steps both ways. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spec_dict(root: str, name: str, steps: int, every: int, upload: str, workers: int, mlflow: bool = False) -> dict:
    return {
        "kind": "Training", "name": name, "storage": {"root": root},
        "data": {"path": str(ROOT / "examples" / "data" / "train.jsonl"), "max_seq_len": 128, "eval_fraction": 0.05},
        "train": {"steps": steps, "batch_size": 8, "learning_rate": 1e-3, "checkpoint_every_n_steps": every,
                  "checkpoint_upload": upload, "checkpoints_to_keep": 2},
        "resources": {"num_workers": workers, "cpus_per_worker": 1},
        # --mlflow: register each run, so rank 0 also logs its live curves to MLflow while it trains.
        "registry": {"enabled": mlflow},
    }


def plain_loop(cfg: dict, blocks, steps: int) -> float:
    """The bare engine: the same model, data order and optimiser in a torch loop, no Ray."""
    import torch

    from runtime.training.data import batch_indices
    from runtime.training.loop import build_model, lr_lambda

    torch.set_num_threads(1)  # a 1-CPU Ray Train worker runs with OMP_NUM_THREADS=1
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["optim"]["learning_rate"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 0, steps))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = torch.from_numpy(blocks[batch_indices(step, num_blocks=len(blocks), batch_size=8, world_size=1,
                                                  rank=0, seed=0)].astype("int64"))
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--mlflow", action="store_true",
                   help="registry on: rank 0 logs loss/lr/grad_norm/tokens_per_s to MLflow every 10 steps")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from runtime.ray_env import ray_session
    from runtime.specs import parse_spec
    from runtime.training import run_training
    from runtime.training.runner import prepare

    root = tempfile.mkdtemp(prefix="raylane-bench-train-")
    n = args.steps
    cases = [("final checkpoint only", n, "async"), ("every 50 steps (default), async (default)", 50, "async"),
             ("every 50 steps, sync", 50, "sync"), ("every 10 steps, async", 10, "async"),
             ("every 10 steps, sync", 10, "sync")]
    rows = []
    with ray_session():
        prep = prepare(parse_spec(spec_dict(root, "plain", n, n, "async", 1)))  # builds the token shards
        for i, (label, every, upload) in enumerate(cases):
            # The plain loop runs right before each harness run: on a shared machine the load changes
            # between runs, and each ratio compares two measurements taken under the same load.
            plain = plain_loop(prep.cfg, prep.train_blocks, n)
            r = run_training(parse_spec(spec_dict(root, f"bench-{i}", n, every, upload, args.workers, args.mlflow)))
            n_ckpt = max(1, n // every - 1)  # the last checkpoint falls after the final measurement
            rows.append((label, plain, r.steps_per_second, r.checkpoint_seconds, n_ckpt if every < n else 0))
    print(f"\nTraining harness (Ray Train v2) vs plain torch loop: tiny Llama, batch 8 x 128 tokens, "
          f"{args.workers} worker(s), {n} steps{', live MLflow curves' if args.mlflow else ''}\n")
    print("| harness checkpoints | plain loop steps/s | harness steps/s | harness / plain | "
          "loop time in checkpoints | per checkpoint |")
    print("|---|---|---|---|---|---|")
    for label, plain, sps, ck, k in rows:
        per = f"{ck / k * 1000:.0f} ms" if k else "-"
        print(f"| {label} | {plain:.1f} | {sps:.1f} | {sps / plain:.2f}x | {ck:.2f} s | {per} |")


if __name__ == "__main__":
    main()
