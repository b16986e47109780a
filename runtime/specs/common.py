"""Fields every workload spec shares: identity, resources, storage, queueing.

Each shape's spec (``TrainingSpec``, ``FineTuneSpec``, ...) subclasses ``SpecBase``. Specs reject
unknown keys (``extra="forbid"``) so a typo is an error, never a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_STORAGE_ROOT = "~/.raylane"


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class Resources(StrictModel):
    """Compute for the workload: a gang of identical workers (or engine replicas)."""

    num_workers: int = Field(1, ge=1, description="Workers (training) or engine replicas (inference).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs each worker reserves; fractions allowed.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves; 0 runs on CPU.")
    memory_gb_per_worker: float | None = Field(
        None, gt=0, description="Memory each worker needs (Kubernetes requests/limits); None = unset."
    )
    accelerator_type: str | None = Field(
        None,
        description="GPU type the workers need, e.g. 'A100-80GB', 'H100', 'L4' (Ray accelerator_type "
        "and the KubeRay node selector). None = any.",
    )

    @property
    def uses_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class Storage(StrictModel):
    """Where checkpoints, outputs, the model registry and sessions live."""

    root: str = Field(
        default_factory=lambda: os.environ.get("RAYLANE_STORAGE_ROOT", DEFAULT_STORAGE_ROOT),
        description="Local path or s3:// URI. Default $RAYLANE_STORAGE_ROOT or ~/.raylane.",
    )

    @property
    def is_remote(self) -> bool:
        return "://" in self.root

    def local_path(self) -> Path:
        """The root as an absolute local path (only for local roots)."""
        return Path(self.root).expanduser().resolve()


class Queue(StrictModel):
    """The Kubernetes batch queue that admits the workload."""

    system: Literal["kueue", "volcano", "yunikorn"] = Field(description="Queue system on the cluster.")
    name: str = Field(min_length=1, description="Queue name (Kueue LocalQueue, Volcano or YuniKorn queue).")


class SpecBase(StrictModel):
    """Identity and placement shared by every shape."""

    kind: str = Field(description="Workload shape; fixed per spec class.")
    name: str = Field(
        min_length=1,
        max_length=63,
        description="Run name: lowercase letters, digits and '-' (it names Ray jobs and Kubernetes objects).",
    )
    description: str | None = Field(None, description="Free text for humans.")
    resources: Resources = Field(default_factory=Resources, description="Workers and their CPUs/GPUs.")
    storage: Storage = Field(default_factory=Storage, description="Storage root for everything the run writes.")
    queue: Queue | None = Field(None, description="Kubernetes queue (Kueue, Volcano, YuniKorn); None = no queue.")
    priority: str | None = Field(
        None, description="Kubernetes PriorityClass name (also the Kueue workload priority class)."
    )

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "must be lowercase letters, digits and '-', starting and ending with a letter or digit "
                f"(e.g. {re.sub(r'[^a-z0-9-]+', '-', v.lower()).strip('-') or 'my-run'!r})"
            )
        return v

    def run_dir(self) -> str:
        """Where this run's files go: ``<storage root>/<kind>/<name>``."""
        return f"{self.storage.root.rstrip('/')}/runs/{self.name}"
