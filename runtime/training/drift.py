"""Drift trigger: evaluate the champion on recent data; fine-tune when its loss degraded too far.

>>> from runtime.training import check_drift
>>> check_drift(load_spec("examples/finetune.yaml")).to_dict()["degraded"]     # doctest: +SKIP

The fine-tune it starts is a fresh run (``<name>-drift-<time>``) registering into the same model
name, so the eval gate decides whether it replaces the champion.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from runtime.errors import RaylaneError
from runtime.log import logger
from runtime.ray_env import ray_session
from runtime.registry import CHAMPION, Registry
from runtime.training.evaluate import evaluate_model

_log = logger("train")


@dataclass
class DriftResult:
    model: str
    champion_version: int | None
    recorded_eval_loss: float | None
    recent_eval_loss: float | None
    degradation: float | None
    max_degradation: float
    degraded: bool
    action: str  # "none", "fine-tuned", "submitted", "would-fine-tune"
    run_name: str | None = None
    job_id: str | None = None
    finetune: dict[str, Any] | None = None
    ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def degradation(recorded: float, recent: float) -> float:
    """Relative increase of the loss: 0.25 = 25 % worse than when it was registered."""
    return (recent - recorded) / abs(recorded) if recorded else float("inf")


def drift_run_name(name: str, now: float | None = None) -> str:
    return f"{name[:45].rstrip('-')}-drift-{int(now or time.time())}"


def check_drift(spec, *, address: str | None = None, submit: bool = True, spec_path: str | None = None) -> DriftResult:
    import ray
    from transformers import AutoTokenizer

    from runtime.training.data import load_documents, pack
    from runtime.training.runner import run_train_spec

    if spec.kind != "FineTune" or spec.drift is None:
        raise RaylaneError(f"{spec.name}: drift checks need a FineTune spec with a 'drift:' section",
                           hint="add drift: {data: {path: recent.jsonl}, max_degradation: 0.1}")
    name = spec.registered_name()
    reg = Registry(spec.storage.resolved())
    champ = reg.alias(name, CHAMPION)
    recorded = champ.metrics.get("eval_loss") if champ else None
    recent = None
    is_remote_submit = bool(address and address.startswith(("http://", "https://")))
    with ray_session(None if is_remote_submit else address):
        if champ is not None and recorded is not None:
            base = champ.tags.get("raylane.base_model_path") or champ.source
            tok = AutoTokenizer.from_pretrained(base)
            blocks = pack(tok, load_documents(spec.drift.data, tok), spec.drift.data.max_seq_len)
            if len(blocks) == 0:
                raise RaylaneError(f"{spec.drift.data.path}: too little recent data for one {spec.drift.data.max_seq_len}-token sequence")
            task = ray.remote(evaluate_model).options(num_cpus=1, max_retries=1)
            recent = ray.get(task.remote(champ.source, blocks))["eval_loss"]
        deg = degradation(recorded, recent) if recent is not None else None
        degraded = deg is None or deg > spec.drift.max_degradation
        why = ("no champion with an eval_loss yet" if deg is None else
               f"champion v{champ.version}: eval_loss {recorded:.4f} -> {recent:.4f} on recent data ({deg:+.1%}, "
               f"threshold {spec.drift.max_degradation:.0%})")
        _log(f"drift check {name}: {why}")
        result = DriftResult(name, champ.version if champ else None, recorded, recent, deg,
                             spec.drift.max_degradation, degraded, "none")
        if not degraded:
            return result
        run_name = drift_run_name(spec.name)
        result.run_name = run_name
        if not submit:
            result.action = "would-fine-tune"
            return result
        if is_remote_submit:
            from ray.job_submission import JobSubmissionClient

            if not spec_path:
                raise RaylaneError("submitting the fine-tune to a cluster needs the spec file path")
            result.job_id = JobSubmissionClient(address).submit_job(
                entrypoint=f"python -m jobs.finetune --spec {spec_path} --run-name {run_name}",
                runtime_env={"working_dir": "."},
            )
            result.action = "submitted"
            return result
        result.finetune = run_train_spec(spec.with_run_name(run_name), address=address).to_dict()
        result.action = "fine-tuned"
        return result
