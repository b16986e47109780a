"""Spec for ``BatchInference``: a known corpus, sharded, through Ray Data + vLLM."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from runtime.specs.common import SpecBase, StrictModel


class BatchInput(StrictModel):
    path: str = Field(description="File or folder: local path or s3:// URI.")
    format: Literal["jsonl", "parquet", "csv"] | None = Field(None, description="None = from the suffix.")
    id_column: str = Field("id", description="Unique row id; the completeness proof is keyed on it.")
    prompt_column: str | None = Field("prompt", description="Column with the prompt text.")
    messages_column: str | None = Field(None, description="Column with chat messages instead of a prompt.")

    @model_validator(mode="after")
    def _one_source(self):
        if self.messages_column:
            self.prompt_column = None
        if not self.prompt_column:
            raise ValueError("set prompt_column or messages_column")
        return self


class SamplingSpec(StrictModel):
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = 0


class BatchOutput(StrictModel):
    path: str = Field(description="Output folder: local path or s3:// URI.")
    format: Literal["jsonl", "parquet"] = "parquet"


class BatchInferenceSpec(SpecBase):
    """Offline generation over a corpus (``kind: BatchInference``)."""

    kind: Literal["BatchInference"] = "BatchInference"
    model: str = Field(description="Model folder, 'tiny', or registry alias models:/name@alias.")
    adapter: str | None = Field(None, description="LoRA adapter folder or models:/name@alias.")
    input: BatchInput
    output: BatchOutput
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    rows_per_shard: int = Field(1000, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longer prompts become error rows.")
    max_model_len: int = Field(2048, ge=16)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to vLLM as is.")
    schedule: str | None = Field(None, description="Cron schedule (KubeRay RayCronJob), e.g. '0 2 * * *'.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) != 5:
            raise ValueError("must be a 5-field cron expression such as '0 2 * * *'")
        return v
