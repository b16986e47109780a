"""The per-worker training harness that Ray Train runs on every worker of the gang.

It owns what every recipe needs and none should rewrite: resume from ``ray.train.get_checkpoint()``,
deterministic data position, the optimiser and schedule, gradient clipping, the NaN/exploding-norm
guard, checkpoints (``step-000120/``: weights, optimiser, scheduler, RNG, data position, loss
history and the spec beside them) and progress. A recipe only builds the model; a user's
``step_fn`` only computes the loss.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import tempfile
import time

from runtime.imports import load_callable
from runtime.log import note
from runtime.metrics import RayMetrics
from runtime.training.tracking import LiveCurves

STATE_FILE = "state.pt"
MODEL_DIR = "model"


def load_state(path: str) -> dict:
    """A checkpoint's training state, unpickled as data only (``weights_only``): a checkpoint store
    that someone else can write must not be able to run code in the job. The RNG state holds one
    numpy array, so numpy's array reconstruction (data, not code) is allowed as well."""
    import numpy as np
    import torch

    np_core = getattr(np, "_core", None) or np.core
    allowed = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def causal_lm_loss(model, batch, step):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_model(cfg: dict):
    """The recipe's model (``runtime.training.recipes``): a Llama from a config, or LoRA on a base."""
    return cfg["recipe"].build(cfg["optim"]["seed"])


def prepare_checkpointing(model, cfg: dict):
    """Pay a checkpoint's one-time costs before the loop, not at its first checkpoint: the tokenizer a
    full-model checkpoint carries is loaded once (None for LoRA adapters), and a throwaway save warms
    save_pretrained's first-call imports (~250 ms on a 2-core machine, against ~15 ms per save later)."""
    tokenizer = cfg["recipe"].checkpoint_tokenizer()
    with tempfile.TemporaryDirectory(prefix="raylane-warmup-") as tmp:
        save_model(model, tmp, tokenizer)
    return tokenizer


def save_model(model, directory: str, tokenizer=None) -> None:
    """Weights in Hugging Face layout (a peft adapter for LoRA), plus the tokenizer for full models."""
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_weights(model, directory: str, cfg: dict) -> None:
    cfg["recipe"].load_weights(model, directory)


def _write_json(uri: str, obj: dict) -> None:
    from runtime.storage import write_bytes_atomic

    write_bytes_atomic(uri, json.dumps(obj).encode())


def train_loop_per_worker(cfg: dict) -> None:
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointUploadMode

    from runtime.storage import join
    from runtime.training.data import batch_indices, data_position

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    optim = cfg["optim"]
    run_dir = cfg["run_dir"]
    if os.environ.get("RAYLANE_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["RAYLANE_TORCH_THREADS"]))
    # TokenShards: memory-mapped token shards; a step reads only its batch's rows.
    blocks = cfg["train_shards"]
    num_blocks = len(blocks)
    total = cfg["total_steps"]
    step_fn = load_callable(optim["step_fn"], field="train.step_fn") if optim.get("step_fn") else causal_lm_loss

    model = build_model(cfg)
    start, losses, state = 0, [], None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            load_weights(model, os.path.join(d, MODEL_DIR), cfg)
            state = load_state(os.path.join(d, STATE_FILE))
        start, losses = state["step"], list(state["losses"])
    model = ray.train.torch.prepare_model(model)  # moves to the worker's device, wraps in DDP
    device = ray.train.torch.get_device()
    # The optimiser is built after the move so its restored state lands on the same device.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim["learning_rate"], weight_decay=optim["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim["schedule"], optim["warmup_steps"], total))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
    resumed_from = start if ckpt else None

    # The Ray node too: one host can run several Ray nodes (runtime.testing's clusters).
    worker = {"pid": os.getpid(), "node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    _write_json(join(run_dir, "workers", f"rank-{rank}.json"), {**worker, "step": start, "time": time.time()})
    if rank == 0:
        _write_json(join(run_dir, "attempts", f"{time.time():.6f}-{os.getpid()}.json"),
                    {"pid": os.getpid(), "start_step": start, "resumed_from_step": resumed_from, "time": time.time()})
        where = f"resuming from step {start}" if ckpt else "starting"
        note("raylane", f"{cfg['name']}: {where}; {total} steps, {world} worker(s)")

    tokenizer = prepare_checkpointing(getattr(model, "module", model), cfg) if rank == 0 else None
    model.train()
    upload = CheckpointUploadMode.ASYNC if optim["checkpoint_upload"] == "async" else CheckpointUploadMode.SYNC
    clip = optim["grad_clip"] or float("inf")
    every = optim["checkpoint_every_n_steps"]
    curves = _Curves(cfg, world) if rank == 0 else None  # before t0: it connects to MLflow
    t0, window, ckpt_seconds = time.perf_counter(), [], 0.0

    for step in range(start, total):
        idx = batch_indices(step, num_blocks=num_blocks, batch_size=optim["batch_size"], world_size=world,
                            rank=rank, seed=optim["seed"])
        x = torch.from_numpy(np.asarray(blocks[idx], dtype=np.int64)).to(device)
        loss = step_fn(model, {"input_ids": x, "labels": x}, step)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        # Every rank must take the same decision, so the guard looks at the averaged loss.
        stats = torch.stack([loss.detach().float(), norm.detach().float()])
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        loss_v, norm_v = float(stats[0]), float(stats[1])
        problem = None
        if not math.isfinite(loss_v):
            problem = f"loss is {loss_v} at step {step + 1}"
        elif not math.isfinite(norm_v) or (optim["max_grad_norm"] and norm_v > optim["max_grad_norm"]):
            problem = f"gradient norm {norm_v:.4g} exceeds train.max_grad_norm={optim['max_grad_norm']} at step {step + 1}"
        if problem:
            if rank == 0:
                _write_json(join(run_dir, "guard.json"), {"step": step + 1, "problem": problem, "time": time.time()})
            if curves is not None:
                curves.close()  # the curve up to the bad step is what explains it
            return  # no optimiser step, no checkpoint: the last good checkpoint stays the latest
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_v)
        window.append(loss_v)
        done = step + 1
        if curves is not None:
            curves.step(done, total, loss_v, norm_v, sched.get_last_lr()[0], x.numel())
        if done % every and done != total:
            continue
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done, "loss": sum(window) / len(window), "grad_norm": norm_v, "lr": sched.get_last_lr()[0],
            "resumed_from_step": resumed_from, "steps_per_second": (done - start) / elapsed if elapsed else 0.0,
            "checkpoint_seconds": ckpt_seconds,
            **data_position(done, num_blocks, optim["batch_size"], world),
        }
        window = []
        checkpoint = None
        t_ckpt = time.perf_counter()
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix=f"raylane-step-{done:06d}-")
            save_model(getattr(model, "module", model), os.path.join(tmp, MODEL_DIR), tokenizer)
            torch.save({
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": done, "losses": losses,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "data_position": data_position(done, num_blocks, optim["batch_size"], world),
            }, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, "spec.yaml"), "w") as f:
                f.write(cfg["spec_yaml"])
            checkpoint = Checkpoint.from_directory(tmp)
            note("raylane", f"{cfg['name']}: step {done}/{total} loss {metrics['loss']:.4f} "
                 f"grad_norm {norm_v:.3g} ({metrics['steps_per_second']:.1f} steps/s)")
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{done:06d}",
                         checkpoint_upload_mode=upload)
        if checkpoint is not None and upload == CheckpointUploadMode.SYNC:
            shutil.rmtree(tmp, ignore_errors=True)
        # What a checkpoint costs the training loop (save + report); the benchmark reports it.
        ckpt_seconds += time.perf_counter() - t_ckpt
        _write_json(join(run_dir, "workers", f"rank-{rank}.json"), {**worker, "step": done, "time": time.time()})
    if curves is not None:
        curves.close()


class _Curves:
    """Rank 0's live metrics: every ``train.log_every_n_steps`` steps (and the last), the window's
    mean loss, learning rate, gradient norm and tokens/s go to the MLflow run the driver opened
    (``cfg["mlflow"]``, when the registry is on) and to Ray's Prometheus metrics. Per step it only
    adds to the window; the writes happen on LiveCurves' thread."""

    def __init__(self, cfg: dict, world: int):
        self.job, self.world, self.n = cfg["name"], world, cfg["optim"]["log_every_n_steps"]
        self.losses: list[float] = []
        self.ray = RayMetrics("raylane_train_steps", "raylane_train_tokens", "raylane_train_loss",
                              "raylane_train_learning_rate")
        self.mlflow = None
        if cfg.get("mlflow"):
            self.mlflow = LiveCurves(cfg["mlflow"]["tracking_uri"], cfg["mlflow"]["run_id"])
        self.tokens, self.t0 = 0, time.perf_counter()  # after connecting: tokens/s counts the loop only

    def step(self, done: int, total: int, loss: float, norm: float, lr: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens * self.world  # every rank takes a batch of the same shape
        if done % self.n and done != total:
            return
        now = time.perf_counter()
        m = {"loss": sum(self.losses) / len(self.losses), "lr": lr, "grad_norm": norm,
             "tokens_per_s": self.tokens / max(now - self.t0, 1e-9)}
        if self.mlflow is not None:
            self.mlflow.log(done, **m)
        self.ray.inc("raylane_train_steps", len(self.losses), job=self.job)
        self.ray.inc("raylane_train_tokens", self.tokens, job=self.job)
        self.ray.set("raylane_train_loss", m["loss"], job=self.job)
        self.ray.set("raylane_train_learning_rate", lr, job=self.job)
        self.losses, self.tokens, self.t0 = [], 0, now

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.close()
