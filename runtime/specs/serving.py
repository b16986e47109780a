"""Spec for ``OnlineInference``: an OpenAI-compatible vLLM endpoint on Ray Serve."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from runtime.specs.common import SpecBase, StrictModel


class SLOSpec(StrictModel):
    ttft_ms_p95: float | None = Field(None, gt=0, description="Time-to-first-token target, p95.")
    tpot_ms_p95: float | None = Field(None, gt=0, description="Time per output token target, p95.")


class AutoscalingSpec(StrictModel):
    min_replicas: int | None = Field(None, ge=0, description="None = 1 with an SLO, 0 without.")
    max_replicas: int = Field(1, ge=1)
    target_waiting_per_replica: float = Field(2.0, gt=0)
    kv_cache_threshold: float = Field(0.8, gt=0, le=1)
    downscale_cooldown_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class OnlineInferenceSpec(SpecBase):
    """A served model (``kind: OnlineInference``)."""

    kind: Literal["OnlineInference"] = "OnlineInference"
    model: str = Field(description="Model folder, 'tiny', or registry alias models:/name@alias.")
    model_id: str | None = Field(None, description="Name clients send as 'model'; default = spec name.")
    adapters: list[str] = Field(default_factory=list, description="LoRA adapters (registry names or folders).")
    max_model_len: int = Field(2048, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to vLLM as is.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    slo: SLOSpec | None = None
    auth: Literal["api-key", "none"] = "api-key"
    port: int = Field(8000, ge=1, le=65535)
