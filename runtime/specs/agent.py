"""Spec for ``Agent``: tool-using sessions on Ray actors behind a Serve ingress."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from runtime.specs.common import SpecBase, StrictModel


class AgentLLM(StrictModel):
    model: str | None = Field("tiny", description="Model served beside the agent (folder, 'tiny', models:/...).")
    url: str | None = Field(None, description="Any OpenAI-compatible base URL instead of a co-located model.")
    max_tokens: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _one(self):
        if self.url:
            self.model = None
        if not self.model and not self.url:
            raise ValueError("set model (served beside the agent) or url (an OpenAI-compatible endpoint)")
        return self


class ToolSpec(StrictModel):
    name: str = Field(min_length=1)
    import_path: str = Field(description="module:function implementing the tool.")
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(1, ge=0)
    max_concurrency: int = Field(4, ge=1)
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments.")


class RetrievalSpec(StrictModel):
    corpus: str = Field(description="Documents to index (jsonl/parquet with a text column).")
    index: str | None = Field(None, description="Index location; default under the storage root.")
    text_column: str = "text"
    top_k: int = Field(3, ge=1)


class BudgetSpec(StrictModel):
    max_steps: int = Field(8, ge=1)
    max_tokens: int = Field(4096, ge=1)
    max_wall_s: float = Field(120.0, gt=0)
    max_tool_failures: int = Field(3, ge=0)


class SessionStoreSpec(StrictModel):
    backend: Literal["sqlite", "redis"] = "sqlite"
    url: str | None = Field(None, description="sqlite path or redis://host:port/db; default under storage root.")


class AgentSpec(SpecBase):
    """An agent served over HTTP (``kind: Agent``)."""

    kind: Literal["Agent"] = "Agent"
    llm: AgentLLM = Field(default_factory=AgentLLM)
    system_prompt: str = "You are a helpful assistant. Use tools when they help."
    tools: list[ToolSpec] = Field(default_factory=list)
    retrieval: RetrievalSpec | None = None
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    sessions: SessionStoreSpec = Field(default_factory=SessionStoreSpec)
    auth: Literal["api-key", "none"] = "api-key"
    port: int = Field(8000, ge=1, le=65535)
