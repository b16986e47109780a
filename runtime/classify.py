"""Which workload shape is this? Five questions, asked in order, and the decision table.

>>> from runtime.classify import classify
>>> classify(new_artifact=False, latency_budget_ms=50, fan_out=False).shape
'online-inference'

1. Does it produce a new model artifact?     yes -> 2, no -> 3
2. Same architecture as a base model?        yes -> fine-tuning, no -> training
3. A tight per-request latency budget?       (with 4) -> online inference or agent
4. Does it fan out into tools, retrieval or multi-step reasoning?  yes -> agent
5. GPU-heavy and multi-hour?                 decides training vs fine-tuning when 2 is open,
                                             and sizes the cluster preference
With no latency budget and no fan-out, the work is known up front: batch inference.
When the answers do not settle it, the default is batch inference, and the reason says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# A latency budget at or under this is "tight": a user (or a caller) waits on each request.
TIGHT_LATENCY_MS = 10_000
MULTI_HOUR = 2.0


@dataclass(frozen=True)
class Decision:
    shape: str
    scheduler: str
    queue: str
    runtime: str
    cluster: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


# The decision table: per shape, how it is scheduled, queued, run and where.
TABLE: dict[str, dict[str, str]] = {
    "training": dict(
        scheduler="gang",
        queue="kueue",
        runtime="Ray Train (TorchTrainer) as a KubeRay RayJob",
        cluster="dedicated multi-node GPU pool, checkpointed; quota-aware queue",
    ),
    "fine-tuning": dict(
        scheduler="gang",
        queue="kueue",
        runtime="Ray Train + peft LoRA as a KubeRay RayJob",
        cluster="shared GPU pool, usually one node",
    ),
    "batch-inference": dict(
        scheduler="default",
        queue="kueue",
        runtime="Ray Data + vLLM as a KubeRay RayJob or RayCronJob",
        cluster="shared or spot GPU pool, scale to zero between runs",
    ),
    "online-inference": dict(
        scheduler="default",
        queue="none (KEDA / Serve autoscaling)",
        runtime="Ray Serve + vLLM as a KubeRay RayService",
        cluster="always-on GPU pool with a warm floor, autoscaled on queue depth",
    ),
    "agent": dict(
        scheduler="default",
        queue="none (KEDA / Serve autoscaling)",
        runtime="Ray Serve ingress + session actors, beside a vLLM RayService",
        cluster="CPU pool for orchestration and tools, GPU pool for the LLM",
    ),
}


def classify(
    new_artifact: bool | None = None,
    same_architecture: bool | None = None,
    latency_budget_ms: float | None = None,
    fan_out: bool | None = None,
    gpu_heavy: bool | None = None,
    hours: float | None = None,
) -> Decision:
    """Answer the five questions (None = not answered) and get the shape with its reason."""
    long_gpu = bool(gpu_heavy) and (hours is None or hours >= MULTI_HOUR)
    heavy_note = (
        f"; GPU-heavy for {hours:g} h: schedule it as a gang on a quota-aware queue" if long_gpu and hours
        else ("; GPU-heavy: schedule it as a gang on a quota-aware queue" if long_gpu else "")
    )

    if new_artifact:
        if same_architecture is True:
            return _decide("fine-tuning", "it produces a new model artifact with the base model's "
                           "architecture: adapt the base (LoRA) rather than train from scratch" + heavy_note)
        if same_architecture is False:
            return _decide("training", "it produces a new model artifact with a new architecture: "
                           "train from a config" + heavy_note)
        if long_gpu:
            return _decide("training", "it produces a new model artifact and is GPU-heavy and multi-hour; "
                           "the architecture question was not answered, so it is treated as training")
        return _decide("batch-inference", "it produces a new model artifact, but whether it keeps a base "
                       "model's architecture was not answered (and it is not GPU-heavy and multi-hour); "
                       "defaulting to batch inference: answer --same-architecture to choose between "
                       "training and fine-tuning")

    tight = latency_budget_ms is not None and latency_budget_ms <= TIGHT_LATENCY_MS
    if fan_out:
        budget = f" within a {latency_budget_ms:g} ms budget" if latency_budget_ms is not None else ""
        return _decide("agent", "it produces no new model and fans out into tools, retrieval or multi-step "
                       f"reasoning per request{budget}: a session loop on actors beside a served model")
    if tight:
        return _decide("online-inference", f"it produces no new model and each request has a tight "
                       f"{latency_budget_ms:g} ms latency budget with no fan-out: a served endpoint that "
                       "scales on queue depth")
    if new_artifact is False:
        why = ("no per-request latency budget" if latency_budget_ms is None
               else f"a loose {latency_budget_ms:g} ms latency budget")
        return _decide("batch-inference", f"it produces no new model, has {why} and no fan-out: the "
                       "whole input is known up front, so process it in shards for throughput")
    return _decide("batch-inference", "the answers do not settle it (whether it produces a new model "
                   "artifact was not answered and there is no latency budget or fan-out); defaulting to "
                   "batch inference, the cheapest shape to run and to change later")


def _decide(shape: str, reason: str) -> Decision:
    return Decision(shape=shape, reason=reason, **TABLE[shape])
