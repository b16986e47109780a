"""Specs for the two Ray Train shapes: ``Training`` (from a config) and ``FineTune`` (LoRA).

>>> from runtime.specs import load_spec
>>> spec = load_spec("examples/finetune.yaml")        # doctest: +SKIP
>>> spec.train.checkpoint_every_n_steps                # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from runtime.imports import check_import_path
from runtime.specs.common import SpecBase, StrictModel
from runtime.specs.serving import OnlineInferenceSpec, RolloutSpec
from runtime.specs.shape import Shape
from runtime.training import run_finetune, run_training  # light: Ray Train loads when they run


class DatasetSpec(StrictModel):
    """Training data: parquet or jsonl, local path or s3:// URI; plain text or chat messages."""

    path: str = Field(description="File or folder (local path or s3:// URI).")
    format: Literal["jsonl", "parquet"] | None = Field(None, description="None = from the file suffix.")
    text_column: str | None = Field("text", description="Column with plain text.")
    messages_column: str | None = Field(
        None, description="Column with chat messages ([{role, content}]); rendered with the chat template."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1,
        description="Held-out share for evaluation; a document's split is fixed by a hash of its text.",
    )
    max_seq_len: int = Field(128, ge=8, description="Tokens per training sequence (documents are packed).")


class ModelConfigSpec(StrictModel):
    """A Llama-style architecture trained from scratch (the ``Training`` recipe)."""

    hidden_size: int = Field(128, ge=16, description="Hidden size.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(2, ge=1, description="Attention heads (hidden_size / num_heads = head_dim; vLLM CPU needs 64).")
    num_kv_heads: int = Field(1, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(256, ge=16, description="MLP width.")
    vocab_size: int = Field(512, ge=64, description="Embedding rows; at least the tokenizer's vocabulary.")
    max_position_embeddings: int = Field(2048, ge=16, description="Longest sequence the model supports.")
    tokenizer: str = Field("tiny", description="Tokenizer folder, or 'tiny' for raylane's embedded one.")

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class OptimSpec(StrictModel):
    """Loop length, optimiser, guards and checkpoint cadence."""

    steps: int | None = Field(None, ge=1, description="Total optimiser steps (or set epochs; default 100 steps).")
    epochs: int | None = Field(None, ge=1, description="Passes over the training split (or set steps).")
    batch_size: int = Field(8, ge=1, description="Sequences per worker per step.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; None disables clipping.")
    max_grad_norm: float | None = Field(
        1e4, gt=0,
        description="Guard: stop the run when the gradient norm (before clipping) exceeds this; None disables.",
    )
    checkpoint_every_n_steps: int = Field(50, ge=1, description="Checkpoint cadence (the last step is always saved).")
    checkpoints_to_keep: int = Field(2, ge=1, description="Newest checkpoints kept under the storage root.")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async",
        description="'async' uploads checkpoints in the background (training continues); 'sync' blocks the "
        "step until the upload is done.",
    )
    log_every_n_steps: int = Field(
        10, ge=1,
        description="Rank 0 logs loss, learning rate, gradient norm and tokens/s every N steps (and the last) "
        "to the run's MLflow run (live curves while training) and to Ray's Prometheus metrics.",
    )
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts (from the last checkpoint) before the run fails."
    )
    step_fn: str | None = Field(
        None,
        description="Your own loss: import path 'pkg.mod:fn' with fn(model, batch, step) -> scalar loss tensor "
        "(batch = {'input_ids', 'labels'}); None = causal-LM loss. The harness does the rest.",
    )
    seed: int = Field(0, description="Seed for weights init, data order and dropout.")

    _check_step_fn = field_validator("step_fn")(classmethod(lambda cls, v: check_import_path(v)))

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set either 'steps' or 'epochs', not both")
        if self.steps is None and self.epochs is None:
            self.steps = 100
        return self


class PlacementSpec(StrictModel):
    """Gang placement: every worker in one Ray placement group, or the run does not start."""

    strategy: Literal["PACK", "STRICT_PACK", "STRICT_SPREAD", "SPREAD"] = Field(
        "PACK",
        description="PACK (few nodes, best effort), STRICT_PACK (one node), STRICT_SPREAD (one worker per node).",
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Fail (naming the missing resources) if the gang cannot be placed within this time."
    )


class EvalSpec(StrictModel):
    """Held-out evaluation and the eval gate that decides promotion to ``champion``."""

    metric: str | None = Field(
        None,
        description="Extra metric: import path 'pkg.mod:fn' with fn(model_dir, texts) -> float or dict of floats.",
    )
    gate_metric: str = Field("eval_loss", description="Metric the gate compares (eval_loss, perplexity or your metric's).")
    higher_is_better: bool = Field(False, description="Direction of gate_metric (loss: lower is better).")
    margin: float = Field(
        0.0, ge=0,
        description="The new model must beat the champion on gate_metric by more than this (absolute) to be promoted.",
    )

    _check_metric = field_validator("metric")(classmethod(lambda cls, v: check_import_path(v)))


class RegistrySpec(StrictModel):
    """MLflow model registry (SQLite under the storage root unless MLFLOW_TRACKING_URI is set)."""

    enabled: bool = Field(True, description="Register the trained model (alias 'challenger', maybe 'champion').")
    model_name: str | None = Field(None, description="Registered model name; None = the spec's name.")


class DriftSpec(StrictModel):
    """``jobs.drift_check``: evaluate the champion on recent data; fine-tune when it has degraded."""

    data: DatasetSpec = Field(description="Recent data to evaluate the champion on (all of it is used).")
    max_degradation: float = Field(
        0.1, ge=0,
        description="Fine-tune when eval_loss on recent data exceeds the champion's registered eval_loss by "
        "more than this fraction (0.1 = 10%).",
    )


class _TrainShape(SpecBase):
    data: DatasetSpec = Field(description="Training data.")
    train: OptimSpec = Field(default_factory=OptimSpec, description="Loop length, optimiser, guards, checkpoints.")
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Gang placement of the workers.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Held-out evaluation and the eval gate.")
    registry: RegistrySpec = Field(default_factory=RegistrySpec, description="Model registry.")

    def registered_name(self) -> str:
        return self.registry.model_name or self.name

    def with_run_name(self, name: str):
        """The same spec as a fresh run called ``name``, registering under the same model name."""
        registry = self.registry.model_copy(update={"model_name": self.registered_name()})
        return self.model_copy(update={"name": name, "registry": registry})


class TrainingSpec(_TrainShape):
    """Causal-LM training from a model config with Ray Train (``kind: Training``)."""

    kind: Literal["Training"] = "Training"
    shape: ClassVar[Shape] = Shape(
        slug="train", runner=run_training, kuberay="RayJob", sizing="gang", job_module="jobs.train",
    )
    model: ModelConfigSpec = Field(default_factory=ModelConfigSpec, description="Architecture to train.")


class LoraSpec(StrictModel):
    """peft LoRA settings."""

    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Module names to adapt."
    )


class ReleaseSpec(StrictModel):
    """Release a version that passes the eval gate through a canary on a serving app (a rollout,
    ``runtime.release``) instead of moving ``champion`` at once."""

    serve: OnlineInferenceSpec = Field(
        description="The serving app to release into: the path of its OnlineInference spec YAML (relative to the "
        "working directory; it is read when this spec loads) or that spec inline (what `raylane render` embeds).",
    )
    adapter: str | None = Field(
        None, description="Key in the app's 'adapters' that serves this model; null = the app's rollout.adapter, "
        "else the one adapter whose registry reference names this fine-tune's registered model.",
    )
    rollout: RolloutSpec | None = Field(
        None, description="Rollout settings (steps, checks, ...) replacing the app's own rollout: section; null = "
        "the app's. The candidate is always the version this run registers.",
    )

    @field_validator("serve", mode="before")
    @classmethod
    def _serve_file(cls, v: Any) -> Any:
        if not isinstance(v, (str, Path)):
            return v
        import yaml

        path = Path(v).expanduser()
        if not path.is_file():
            raise ValueError(f"{str(v)!r} is not a file; give the path of the serving app's OnlineInference spec "
                             "(relative to the working directory) or the spec inline")
        try:
            return yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{str(v)!r} is not valid YAML: {getattr(e, 'problem', None) or e}") from None

    def target(self, model_name: str) -> tuple[str | None, list[str]]:
        """(adapter key of the app that serves ``model_name``, problems)."""
        from runtime.registry import REF_RE

        app = self.serve
        serving = {k: m["name"] for k, ref in app.adapters.items() if (m := REF_RE.match(ref))}
        adapter = self.adapter or (self.rollout.adapter if self.rollout else None) or \
            (app.rollout.adapter if app.rollout else None)
        base = REF_RE.match(app.model)
        if base and base["name"] == model_name:
            return None, [f"release: app {app.name!r} serves models:/{model_name} as its base model ('model'), but a "
                          "FineTune registers LoRA adapters, which release only into an adapter of the app; serve "
                          f"the adapter (adapters: {{NAME: models:/{model_name}@champion}}) or set "
                          "registry.model_name to another name"]
        if adapter is None:
            mine = [k for k, name in serving.items() if name == model_name]
            if len(mine) != 1:
                listed = ", ".join(f"{k} -> {app.adapters[k]}" for k in app.adapters) or "none"
                why = "serves none" if not mine else f"serves it as {', '.join(mine)}"
                return None, [f"release.adapter: app {app.name!r} {why} from models:/{model_name}@... (its adapters: "
                              f"{listed}); name the adapter, or set registry.model_name to the model it serves"]
            adapter = mine[0]
        if adapter not in app.adapters:
            return None, [f"release.adapter: {adapter!r} is not a key of the adapters of app {app.name!r} "
                          f"({', '.join(app.adapters) or 'none declared'})"]
        if serving.get(adapter) != model_name:
            return None, [f"release.adapter: app {app.name!r} serves {adapter!r} from {app.adapters[adapter]!r}, "
                          f"but this fine-tune registers {model_name!r}; set registry.model_name to "
                          f"{serving.get(adapter) or 'the model it serves'!r} or name another adapter"]
        return adapter, []

    def rollout_for(self, adapter: str) -> RolloutSpec:
        """The rollout the gate starts: these settings (else the app's), on ``adapter``."""
        base = self.rollout or self.serve.rollout or RolloutSpec(adapter=adapter)
        return base.model_copy(update={"adapter": adapter, "candidate": None})


class FineTuneSpec(_TrainShape):
    """LoRA fine-tuning of a base causal LM with Ray Train and peft (``kind: FineTune``)."""

    kind: Literal["FineTune"] = "FineTune"
    shape: ClassVar[Shape] = Shape(
        slug="finetune", runner=run_finetune, kuberay="RayJob", sizing="gang", job_module="jobs.finetune",
        model_field="base_model",
    )
    base_model: str = Field(
        description="Base model: HF model folder, 'tiny' (raylane's embedded model) or models:/name@alias."
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter settings.")
    drift: DriftSpec | None = Field(None, description="Drift trigger for `python -m jobs.drift_check`.")
    release: ReleaseSpec | None = Field(
        None, description="Serving app to release into: a version that passes the eval gate starts a rollout "
        "there (canary, then promotion or rollback) instead of becoming champion at once; null = the gate "
        "moves champion itself.",
    )

    @model_validator(mode="after")
    def _release(self):
        r = self.release
        if r is None:
            return self
        from runtime.specs.serving import rollout_problems

        problems = []
        if not self.registry.enabled:
            problems.append("release needs the registry (registry.enabled: true): a rollout releases a registered "
                            "version")
        if r.rollout is not None and r.rollout.candidate is not None:
            problems.append("release.rollout.candidate: the candidate is the version this run registers; drop it")
        if r.serve.storage.resolved() != self.storage.resolved():
            problems.append(f"release.serve.storage.root ({r.serve.storage.root!r}) is not storage.root "
                            f"({self.storage.root!r}): the app's replicas read the registry and the rollout under "
                            "their root; use one root for both")
        adapter, found = r.target(self.registered_name())
        problems += found
        if adapter is not None:
            problems += [p.replace("rollout.", "release.rollout.", 1) if p.startswith("rollout.") else p
                         for p in rollout_problems(r.serve, r.rollout_for(adapter))]
        if problems:
            raise ValueError("; ".join(problems))
        return self
