"""The quickstart: every workload shape, end to end, on one machine with nothing else installed.

>>> from runtime.quickstart import quickstart
>>> result = quickstart(workdir=".raylane/quickstart")   # doctest: +SKIP

Stages run in order on one local Ray cluster (or ``address``); each returns a dict of what it
did, printed as it finishes. A failing stage stops the quickstart with its error.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class QuickstartContext:
    workdir: Path
    model_dir: Path | None = None
    adapter_dir: Path | None = None
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuickstartResult:
    workdir: str
    ray_address: str
    stages: list[dict[str, Any]]
    seconds: float
    ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def stage_tiny_model(ctx: QuickstartContext) -> dict:
    from runtime.tiny_model import model_fingerprint, write_tiny_model

    ctx.model_dir = write_tiny_model(ctx.workdir / "models" / "tiny-llama", seed=0)
    return {"model": str(ctx.model_dir), "fingerprint": model_fingerprint(ctx.model_dir)}


def _lazy(target: str) -> Callable[[QuickstartContext], dict]:
    """A stage by import path, so importing this module loads no shape's code."""

    def call(ctx: QuickstartContext) -> dict:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)(ctx)

    call.__name__ = target
    return call


STAGES: list[tuple[str, str, Callable[[QuickstartContext], dict]]] = [
    ("tiny-model", "write the embedded tiny Llama", stage_tiny_model),
    ("train", "tiny training, a LoRA fine-tune, the eval gate and registration (Ray Train, MLflow)",
     _lazy("runtime.training.quickstart:stage_train_finetune")),
    ("batch", "batch inference over a sample corpus, then verify the output",
     _lazy("runtime.batch.quickstart:stage_batch")),
    ("serve", "serve the model with the fine-tuned adapter on Ray Serve and stream one chat reply",
     _lazy("runtime.serving.quickstart:stage_serve")),
    ("agent", "an agent session with a calculator and retrieval over the sample corpus",
     _lazy("runtime.agents.quickstart:stage_agent")),
]


Stage = tuple[str, str, Callable[[QuickstartContext], dict]]


def quickstart(
    workdir: str | Path = ".raylane/quickstart",
    address: str | None = None,
    extra_stages: list[Stage] | None = None,
) -> QuickstartResult:
    """Run every stage; ``extra_stages`` (e.g. the CLI's KubeRay render) run after the built-in ones."""
    from runtime.ray_env import ray_session

    stages = STAGES + list(extra_stages or [])
    t0 = time.perf_counter()
    ctx = QuickstartContext(workdir=Path(workdir).expanduser().resolve())
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    with ray_session(address) as info:
        _log(f"Ray at {info.address} ({info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs); work dir {ctx.workdir}")
        for i, (name, what, fn) in enumerate(stages, 1):
            _log(f"[{i}/{len(stages)}] {name}: {what} ...")
            s = time.perf_counter()
            details = fn(ctx)
            secs = round(time.perf_counter() - s, 2)
            ctx.results[name] = details
            done.append({"stage": name, "seconds": secs, **details})
            _log(f"[{i}/{len(stages)}] {name}: done in {secs:g} s")
        address_used = info.address
    return QuickstartResult(str(ctx.workdir), address_used, done, round(time.perf_counter() - t0, 2))
