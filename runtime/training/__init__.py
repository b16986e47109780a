"""Ray Train shapes: ``Training`` (causal LM from a config) and ``FineTune`` (LoRA with peft).

>>> from runtime.specs import load_spec
>>> from runtime.training import run_finetune
>>> run_finetune(load_spec("examples/finetune.yaml")).to_dict()["registry"]    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any


def run_training(spec, *, address: str | None = None, **opts: Any):
    """Train a causal LM from ``spec.model`` on Ray Train; returns a ``TrainResult``."""
    from runtime.training.runner import run_train_spec

    return run_train_spec(spec, address=address, **opts)


def run_finetune(spec, *, address: str | None = None, **opts: Any):
    """LoRA fine-tune ``spec.base_model`` on Ray Train; returns a ``TrainResult``."""
    from runtime.training.runner import run_train_spec

    return run_train_spec(spec, address=address, **opts)


def check_drift(spec, *, address: str | None = None, submit: bool = True, spec_path: str | None = None):
    """Evaluate the champion on ``spec.drift.data``; fine-tune when it degraded (``jobs.drift_check``)."""
    from runtime.training.drift import check_drift as _check

    return _check(spec, address=address, submit=submit, spec_path=spec_path)


__all__ = ["check_drift", "run_finetune", "run_training"]
