"""Held-out evaluation (loss, perplexity, an optional metric by import path) and the eval gate.

>>> from runtime.training.evaluate import evaluate_model, gate_decision
>>> evaluate_model("/path/to/adapter", blocks)                  # doctest: +SKIP
{'eval_loss': 5.1, 'perplexity': 164.0}
>>> gate_decision({"eval_loss": 5.0}, {"eval_loss": 5.2}, "eval_loss", margin=0.1).promote
True
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from runtime.imports import load_callable


def _localize(model_dir: str) -> str:
    """transformers reads local folders; copy an s3:// (or other remote) model folder to a temp dir."""
    if "://" not in model_dir or model_dir.startswith("file://"):
        return model_dir.removeprefix("file://")
    import tempfile

    import pyarrow.fs as pafs

    from runtime import storage

    fs, path = storage.resolve(model_dir)
    dest = tempfile.mkdtemp(prefix="raylane-eval-")
    pafs.copy_files(path, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def load_causal_lm(model_dir: str):
    """A full model folder, or a peft adapter folder on top of its base model."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = _localize(model_dir)
    adapter_cfg = os.path.join(model_dir, "adapter_config.json")
    if os.path.isfile(adapter_cfg):
        from peft import PeftModel

        with open(adapter_cfg) as f:
            base_dir = json.load(f)["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def evaluate_model(model_dir: str, blocks, *, batch_size: int = 8, metric: str | None = None,
                   texts: list[str] | None = None) -> dict[str, float]:
    """Mean next-token loss over ``blocks`` ([n, seq] token ids) and its perplexity."""
    import torch

    model = load_causal_lm(model_dir)
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            x = torch.as_tensor(blocks[i:i + batch_size]).long()
            total += float(model(input_ids=x, labels=x).loss) * len(x)
            n += len(x)
    loss = total / max(n, 1)
    out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if metric:
        value = load_callable(metric, field="eval.metric")(model_dir, texts or [])
        out.update(value if isinstance(value, dict) else {metric.rpartition(":")[2]: float(value)})
    return out


@dataclass
class GateDecision:
    promote: bool
    reason: str
    metric: str
    new: float | None
    champion: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def gate_decision(new: dict, champion: dict | None, metric: str, *, margin: float = 0.0,
                  higher_is_better: bool = False) -> GateDecision:
    """Promote when there is no champion, or when ``new`` beats it on ``metric`` by more than ``margin``."""
    value = new.get(metric)
    if value is None:
        return GateDecision(False, f"the new model has no metric {metric!r} (has: {', '.join(new)})", metric, None, None)
    if champion is None:
        return GateDecision(True, "no champion yet", metric, value, None)
    best = champion.get(metric)
    if best is None:
        return GateDecision(True, f"the champion has no {metric!r} on this data", metric, value, None)
    gain = (value - best) if higher_is_better else (best - value)
    word = "higher" if higher_is_better else "lower"
    if gain > margin:
        return GateDecision(True, f"{metric} {value:.4f} beats the champion's {best:.4f} by {gain:.4f} "
                            f"(> margin {margin:g})", metric, value, best)
    return GateDecision(False, f"{metric} {value:.4f} vs the champion's {best:.4f}: needs to be {word} by more "
                        f"than margin {margin:g} (gain {gain:.4f}); stays challenger", metric, value, best)
