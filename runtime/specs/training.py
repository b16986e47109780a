"""Specs for the two Ray Train shapes: ``Training`` (from a config) and ``FineTune`` (LoRA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from runtime.specs.common import SpecBase, StrictModel


class DatasetSpec(StrictModel):
    """Training data: parquet or jsonl, local path or s3:// URI; plain text or chat messages."""

    path: str = Field(description="File or folder (local path or s3:// URI).")
    format: Literal["jsonl", "parquet"] | None = Field(None, description="None = from the file suffix.")
    text_column: str | None = Field("text", description="Column with plain text.")
    messages_column: str | None = Field(
        None, description="Column with chat messages ([{role, content}]); rendered with the chat template."
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share for evaluation.")
    max_seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")


class ModelConfigSpec(StrictModel):
    """A Llama-style architecture trained from scratch (the ``Training`` recipe)."""

    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    intermediate_size: int = Field(256, ge=16)
    vocab_size: int = Field(512, ge=64)
    tokenizer: str = Field("tiny", description="Tokenizer path, or 'tiny' for raylane's embedded one.")


class OptimSpec(StrictModel):
    """Loop length, optimiser and checkpoint cadence."""

    steps: int | None = Field(None, ge=1, description="Total optimiser steps (or set epochs).")
    epochs: int | None = Field(None, ge=1, description="Passes over the data (or set steps).")
    batch_size: int = Field(8, ge=1, description="Sequences per worker per step.")
    learning_rate: float = Field(3e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; None disables clipping.")
    checkpoint_every_n_steps: int = Field(50, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if self.steps is None and self.epochs is None:
            self.steps = 100
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set either 'steps' or 'epochs', not both")
        return self


class TrainingSpec(SpecBase):
    """Causal-LM training from a model config with Ray Train (``kind: Training``)."""

    kind: Literal["Training"] = "Training"
    model: ModelConfigSpec = Field(default_factory=ModelConfigSpec)
    data: DatasetSpec
    train: OptimSpec = Field(default_factory=OptimSpec)


class LoraSpec(StrictModel):
    rank: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class FineTuneSpec(SpecBase):
    """LoRA fine-tuning of a base causal LM with Ray Train and peft (``kind: FineTune``)."""

    kind: Literal["FineTune"] = "FineTune"
    base_model: str = Field(
        description="Base model: HF model folder, 'tiny' (raylane's embedded model) or models:/name@alias."
    )
    data: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: OptimSpec = Field(default_factory=OptimSpec)
