"""What makes a shape, declared once on its spec class (``TrainingSpec.shape``, ...).

>>> from runtime.specs import BatchInferenceSpec
>>> s = BatchInferenceSpec.shape
>>> s.slug, s.job_module, s.kuberay, s.sizing, s.model_field
('batch', 'jobs.batch', 'RayJob', 'elastic', 'model')

Every layer reads the declaration instead of keeping a table keyed on ``kind``: ``runtime.run``
calls ``shape.runner``, ``runtime.submit`` runs ``python -m <shape.job_module>``, ``cluster/``
renders ``shape.kuberay`` sized by ``shape.sizing``, stages the weights named by
``shape.model_field`` and embeds ``shape.serve_config(spec)`` in a RayService. A new shape is one
spec class (plus its runner, its ``jobs/`` or ``serve_apps/`` entrypoint and its tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

KubeRayKind = Literal["RayJob", "RayService"]
# gang: a fixed group of num_workers pods (one Ray Train placement group);
# elastic: 0..num_workers pods that the autoscaler adds while work is queued;
# serve: the Serve autoscaling range of engine replicas (the spec's autoscaling section);
# always-on: 1..num_workers pods (a service whose floor is one warm pod).
Sizing = Literal["gang", "elastic", "serve", "always-on"]


@dataclass(frozen=True)
class Shape:
    slug: str  # the one name of the shape: jobs/, serve_apps/, examples/, bench/, tests/
    runner: Callable[..., Any]  # runner(spec, *, address=None, **options): what `raylane run` calls
    kuberay: KubeRayKind  # the KubeRay object the spec renders to
    sizing: Sizing  # how many Ray worker pods the cluster gets
    model_field: str | None = None  # dotted spec attribute naming the model (weight cache); None = no model
    job_module: str | None = None  # `python -m <job_module> --spec S.yaml` (jobs only)
    serve_app: str | None = None  # Serve import path "serve_apps.<slug>:build_..." (services only)
    serve_config: Callable[[Any], dict[str, Any]] | None = None  # spec -> `serve deploy` config (services)

    def __post_init__(self) -> None:
        job = self.kuberay == "RayJob"
        if job != (self.job_module is not None) or job == (self.serve_config is not None):
            raise ValueError(f"shape {self.slug!r}: a RayJob has a job_module, a RayService a serve_config")

    @property
    def is_service(self) -> bool:
        return self.kuberay == "RayService"
