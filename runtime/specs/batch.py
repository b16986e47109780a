"""Spec for ``BatchInference``: a known corpus, sharded, through Ray Data + vLLM.

>>> from runtime.specs import load_spec
>>> spec = load_spec("examples/batch.yaml")      # doctest: +SKIP
>>> spec.rows_per_shard                           # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import re
import string
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from runtime.specs.common import SpecBase, StrictModel
from runtime.specs.shape import Shape


def _run_batch(spec, **options: Any):
    from runtime.batch.runner import run_batch  # Ray Data and vLLM load only for a run

    return run_batch(spec, **options)


class BatchInput(StrictModel):
    """The corpus: one file or a folder of files of one format."""

    path: str = Field(description="File or folder: local path or s3:// URI.")
    format: Literal["jsonl", "parquet", "csv"] | None = Field(
        None, description="File format; None = from the file suffix (.jsonl/.json, .parquet, .csv)."
    )
    id_column: str = Field("id", min_length=1, description="Unique row id; the completeness proof is keyed on it.")
    prompt_column: str | None = Field("prompt", description="Column with the prompt text.")
    messages_column: str | None = Field(
        None,
        description="Column with chat messages ([{role, content}, ...]) instead of a prompt; the model's "
        "chat template turns them into the prompt.",
    )
    incremental: bool = Field(
        False,
        description="Folder input on a schedule: each run processes only the files no earlier run of this "
        "spec committed (a ledger under <storage.root>/runs/<name>/ingested); output.path needs a {date}, "
        "{time} or {datetime} placeholder so each run writes its own folder.",
    )

    @model_validator(mode="before")
    @classmethod
    def _messages_replace_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("messages_column"):
            if data.get("prompt_column"):
                raise ValueError("set prompt_column or messages_column, not both")
            data = {**data, "prompt_column": None}
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if not self.prompt_column and not self.messages_column:
            raise ValueError("set prompt_column or messages_column")
        return self


class SamplingSpec(StrictModel):
    """vLLM sampling parameters applied to every row."""

    max_tokens: int = Field(32, ge=1, description="Most tokens generated per row.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(0, description="Per-request seed, so a rerun of a shard gives the same text.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (benchmarks).")


class BatchOutput(StrictModel):
    """Where the shard files, commit records and manifest go."""

    path: str | None = Field(
        None,
        description="Output folder: local path or s3:// URI; None = <storage.root>/runs/<name>/output. "
        "May hold {date} (2026-12-01), {time} (0200, HHMM) or {datetime} (20261201T0200), filled in "
        "(UTC) when a run starts, so each scheduled run writes its own folder.",
    )
    format: Literal["jsonl", "parquet"] = Field("parquet", description="Format of each shard file.")

    @field_validator("path")
    @classmethod
    def _placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError as e:
            raise ValueError(f"bad placeholder ({e}); use {{date}}, {{time}} or {{datetime}}") from None
        unknown = sorted(names - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; use {{date}}, {{time}} or {{datetime}}")
        return v


# What an output path's placeholders become at the start of a run (UTC).
PLACEHOLDERS = {"date": "%Y-%m-%d", "time": "%H%M", "datetime": "%Y%m%dT%H%M"}


class BatchInferenceSpec(SpecBase):
    """Offline generation over a corpus (``kind: BatchInference``)."""

    kind: Literal["BatchInference"] = "BatchInference"
    shape: ClassVar[Shape] = Shape(
        slug="batch", runner=_run_batch, kuberay="RayJob", sizing="elastic", job_module="jobs.batch",
        model_field="model",
    )
    model: str = Field(description="Model folder, 'tiny', or registry alias models:/name@alias.")
    adapter: str | None = Field(None, description="LoRA adapter folder or models:/name@alias.")
    input: BatchInput = Field(description="The corpus to run over.")
    output: BatchOutput = Field(
        description="Output folder and shard file format (`output: {}` for the default folder)."
    )
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Sampling parameters for every row.")
    rows_per_shard: int = Field(
        1000, ge=1, description="Rows per shard: the unit of commit and of rerun (fixed for an output folder)."
    )
    batch_size: int = Field(64, ge=1, description="Rows per engine call (Ray Data batch to the vLLM stage).")
    max_concurrent_batches: int = Field(
        8, ge=1, description="Batches in flight per engine replica, so vLLM's scheduler stays full."
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longer prompts become error rows.")
    prep_workers: int = Field(
        1, ge=1, description="Most actors of the CPU stage that reads, chat-templates and tokenizes the rows "
        "(on a cluster they run wherever CPUs are free, not on the engine's bundle)."
    )
    prep_cpus: float = Field(1.0, gt=0, description="Logical CPUs each of those actors (and each plan "
                             "digest task) reserves; fractions allowed.")
    prep_node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels (a label_selector) the CPU side of the run must run on: the prepare "
        "actors, the plan and verify tasks, the writer and its forwarder; e.g. {ray.io/node-group: cpu-workers} "
        "(KubeRay labels each node with its worker group). {} = any node with free CPUs.",
    )
    engine_node_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels (a label_selector) the engine replicas must run on, e.g. "
        "{ray.io/node-group: gpu-workers}; {} = wherever their resources fit (resources.gpus_per_worker and "
        "accelerator_type already keep GPU engines on GPU nodes).",
    )
    shard_deadline_s: float | None = Field(
        None, gt=0,
        description="An engine with rows in flight that finishes none of them for this long is stalled: its "
        "actor exits, Ray starts a new one and the rows run again (an engine process that dies is "
        "treated the same at once). None = 60 s + 5 ms x rows_per_shard x sampling.max_tokens.",
    )
    max_model_len: int = Field(2048, ge=16, description="Model context (prompt + output tokens) given to vLLM.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to vLLM as is.")
    schedule: str | None = Field(None, description="Cron schedule (KubeRay RayCronJob), e.g. '0 2 * * *'.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and len(v.split()) != 5:
            raise ValueError("must be a 5-field cron expression such as '0 2 * * *'")
        return v

    def engine_deadline_s(self) -> float:
        """``shard_deadline_s``, or its default from the shard's size."""
        if self.shard_deadline_s is not None:
            return self.shard_deadline_s
        return 60.0 + 0.005 * self.rows_per_shard * self.sampling.max_tokens

    def output_path(self) -> str:
        """Where shard files, commit records and the manifest go (placeholders not yet filled in:
        see ``for_run``)."""
        return self.output.path or f"{self.run_dir()}/output"

    def has_placeholders(self) -> bool:
        return bool(self.output.path and re.search(r"\{(date|time|datetime)\}", self.output.path))

    def for_run(self, now: datetime) -> BatchInferenceSpec:
        """This spec with the output path's placeholders filled in for a run starting at ``now``
        (done once per run, so a run that crosses midnight keeps one folder)."""
        if not self.has_placeholders():
            return self
        path = self.output.path.format(**{k: now.strftime(f) for k, f in PLACEHOLDERS.items()})
        return self.model_copy(update={"output": self.output.model_copy(update={"path": path})})

    def ledger_path(self) -> str:
        """Incremental input: which input files earlier runs of this spec committed."""
        return f"{self.run_dir()}/ingested"

    @model_validator(mode="after")
    def _incremental_needs_a_folder_per_run(self):
        if not self.input.incremental:
            return self
        if not self.has_placeholders():
            raise ValueError(
                "input.incremental: each run processes other files, so each needs its own output folder; "
                "put {date}, {time} or {datetime} in output.path (e.g. s3://bucket/out/{date})"
            )
        path = self.output.path or ""
        if "{datetime}" in path or ("{date}" in path and "{time}" in path):
            return self
        if "{date}" not in path:
            raise ValueError("output.path: {time} alone repeats every day, so a later day's run would reuse "
                             "a folder; use {datetime} or {date}/{time}")
        if self.schedule and _min_gap_s(self.schedule) < 86400:
            raise ValueError(f"output.path: schedule {self.schedule!r} fires more than once a day, so with "
                             "{date} alone its runs would share a folder; use {datetime} or {date}/{time}")
        return self

    @field_validator("prep_node_labels", "engine_node_labels")
    @classmethod
    def _label_selector(cls, v: dict[str, str]) -> dict[str, str]:
        if v:  # Ray loads only for a spec that sets one
            from ray._private.label_utils import validate_label_selector

            problem = validate_label_selector(v)
            if problem:
                raise ValueError(f"not a Ray label selector: {problem}")
        return v

    @model_validator(mode="after")
    def _engine_labels_need_one_device(self):
        devices = int(self.engine_kwargs.get("tensor_parallel_size", 1)) * \
            int(self.engine_kwargs.get("pipeline_parallel_size", 1))
        if self.engine_node_labels and devices > 1:
            raise ValueError("engine_node_labels: not supported with tensor_parallel_size x "
                             "pipeline_parallel_size > 1 (the engine's workers get a placement group); place "
                             "such engines with resources.accelerator_type instead")
        return self

    @field_validator("engine_kwargs")
    @classmethod
    def _no_model_override(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("model", "max_model_len"):
            if key in v:
                raise ValueError(f"set {key!r} at the top level of the spec, not in engine_kwargs")
        return v


def _min_gap_s(schedule: str) -> float:
    """The shortest time between the next few firings of a cron schedule."""
    from croniter import croniter

    try:
        it = croniter(schedule, datetime(2026, 1, 1))
    except (ValueError, KeyError):
        return float("inf")  # the schedule's own check reports it
    times = [it.get_next(datetime) for _ in range(6)]
    return min((b - a).total_seconds() for a, b in itertools.pairwise(times))
