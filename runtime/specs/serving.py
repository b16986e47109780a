"""Spec for ``OnlineInference``: an OpenAI-compatible vLLM endpoint on Ray Serve.

>>> from runtime.specs import parse_spec
>>> spec = parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none"})
>>> spec.autoscaling.floor(spec.slo)
0
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from runtime.imports import check_import_path
from runtime.specs.common import SpecBase, StrictModel
from runtime.specs.shape import Shape


def _run_serving(spec, **options: Any):
    from runtime.serving.runner import run_serving  # Ray Serve loads only for a run

    return run_serving(spec, **options)


def _serve_config(spec) -> dict[str, Any]:
    from runtime.serving.config import build_serve_config

    return build_serve_config(spec)

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Engine settings raylane sets from its own fields; engine_kwargs must not repeat them, or the
# same setting would live in two places of one spec.
OWNED_ENGINE_KEYS = {
    "max_model_len": "max_model_len",
    "dtype": "dtype",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_num_seqs": "max_num_seqs",
    "enable_prefix_caching": "enable_prefix_caching",
    "tensor_parallel_size": "tensor_parallel_size",
    "enable_lora": "adapters",
    "max_lora_rank": "max_lora_rank",
    "enable_auto_tool_choice": "tool_calling",
    "tool_call_parser": "tool_calling",
}


class SLOSpec(StrictModel):
    """Latency targets. Declaring any keeps a warm replica (min_replicas >= 1) by default."""

    ttft_ms_p95: float | None = Field(None, gt=0, description="Time-to-first-token target, p95, in ms.")
    tpot_ms_p95: float | None = Field(None, gt=0, description="Time per output token target, p95, in ms.")


class AutoscalingSpec(StrictModel):
    """Queue-depth and KV-cache autoscaling (never CPU/GPU utilisation): up fast, down slowly."""

    min_replicas: int | None = Field(
        None, ge=0, description="Warm floor. None = 1 when the spec has an slo, 0 (scale to zero) without."
    )
    max_replicas: int = Field(1, ge=1, description="Upper bound on engine replicas.")
    target_waiting_per_replica: float = Field(
        2.0, gt=0, description="Waiting (queued) requests per replica above which a replica is added."
    )
    kv_cache_threshold: float = Field(
        0.8, gt=0, le=1, description="KV-cache usage (0-1) on any replica above which a replica is added."
    )
    downscale_cooldown_s: float = Field(
        300.0, ge=0, description="Load must stay low this long before a replica is removed."
    )
    downscale_step_s: float = Field(
        60.0, ge=0, description="At most one replica is removed per this many seconds."
    )

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    def floor(self, slo: SLOSpec | None) -> int:
        """The warm floor: explicit min_replicas, else 1 with an SLO and 0 without."""
        if self.min_replicas is not None:
            return self.min_replicas
        return 1 if slo is not None else 0


class RateLimitSpec(StrictModel):
    """Per-API-key token bucket, one per key for all replicas together (``runtime.serving.ratelimit``)."""

    requests_per_minute: float = Field(600, gt=0, description="Sustained requests per minute per key.")
    burst: int = Field(60, ge=1, description="Requests a key may send at once before being limited.")
    store: Literal["actor", "redis", "replica"] = Field(
        "actor", description="Where the buckets live: 'actor' (a Ray actor on the head node, one per app), "
        "'redis' (the server at url), or 'replica' (each replica its own: N replicas admit N x the rate).")
    url: str | None = Field(None, description="redis://HOST:PORT/DB of the Redis server (store: redis only).")

    @model_validator(mode="after")
    def _store_url(self):
        if self.store == "redis" and not (self.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store redis needs url: redis://HOST:PORT/DB")
        if self.store != "redis" and self.url is not None:
            raise ValueError(f"url is only read with store: redis (store is {self.store!r}); drop url or set store: redis")
        return self


class ToolCallingSpec(StrictModel):
    """OpenAI tool calling: requests may send ``tools`` with ``tool_choice`` (``auto``,
    ``required`` or a named function) and get ``tool_calls`` back. Turns on vLLM's auto tool
    choice with the model family's tool-call parser (in vLLM 0.29 a named or required
    tool_choice needs both, so there is no separate switch)."""

    parser: str = Field(
        min_length=1,
        description="vLLM tool-call parser for the model family (vLLM's --tool-call-parser), e.g. "
        "'llama3_json' (Llama 3.1+), 'hermes' (Qwen 2.5/3, Hermes), 'mistral', 'pythonic', 'xlam'. "
        "Checked against vLLM's registered parsers when the app is built.",
    )


class QualityProbeSpec(StrictModel):
    """A golden set sent through the live endpoint to both arms each step, scored by your metric."""

    golden_set: str = Field(
        min_length=1,
        description="JSONL file (local path or s3:// URI), one {\"prompt\": ..., \"reference\": ...} per line; "
        "each prompt goes to /v1/completions, greedy (temperature 0).",
    )
    metric: str = Field(
        description="Import path 'pkg.mod:fn' with fn(completions, references) -> float, higher is better "
        "(like eval.metric, it must be importable where the rollout controller runs); "
        "'runtime.release.probe:exact_match' is built in.",
    )
    endpoint: str | None = Field(
        None, pattern=r"^https?://",
        description="Base URL of the app as the rollout controller reaches it (e.g. "
        "http://chat-serve-svc:8000 on KubeRay); null = http://127.0.0.1:<port>, the Serve proxy on "
        "the controller's node.",
    )
    max_drop: float = Field(
        0.0, ge=0, description="The candidate's score may be at most this much (absolute) below the champion's.",
    )
    max_tokens: int = Field(64, ge=1, description="max_tokens of each probe request.")

    _check_metric = field_validator("metric")(classmethod(lambda cls, v: check_import_path(v)))


class RolloutChecksSpec(StrictModel):
    """What the candidate must not do worse than the champion, both arms measured in the same window."""

    max_error_rate_increase: float = Field(
        0.01, ge=0, le=1,
        description="Candidate error rate minus champion error rate, at most (0.01 = one percentage point).",
    )
    max_ttft_p95_ratio: float | None = Field(
        1.25, ge=1, description="Candidate TTFT p95 / champion TTFT p95, at most; null = not checked.",
    )
    max_e2e_p95_ratio: float | None = Field(
        1.25, ge=1, description="Candidate end-to-end latency p95 / champion's, at most; null = not checked.",
    )
    quality: QualityProbeSpec | None = Field(
        None, description="Quality probe: a golden set sent to both arms once per step through the live "
        "endpoint, scored by a metric; null = none.",
    )


class RolloutSpec(StrictModel):
    """A canary release of a candidate against the current champion: traffic shares step up while the
    checks pass; then the candidate is promoted (registry alias champion), else rolled back."""

    adapter: str | None = Field(
        None, description="Key in 'adapters' whose version is released; null = the base model (then 'model' "
        "must be a registry alias, models:/NAME@champion): the candidate gets a Serve app and engine of its own "
        "for the rollout (twice the engine memory meanwhile) and the champion app restarts on promotion.",
    )
    candidate: str | None = Field(
        None,
        description="Registry version or alias of the same registered model as the champion "
        "(models:/NAME/VERSION or models:/NAME@ALIAS); null = models:/NAME@challenger. "
        "`raylane rollout start --candidate REF` overrides it.",
    )
    steps: list[float] = Field(
        default_factory=lambda: [10.0, 50.0, 100.0],
        min_length=1,
        description="Candidate traffic share per step, in percent: strictly increasing, ending at 100.",
    )
    min_step_s: float = Field(300.0, ge=0, description="Seconds a step lasts at least before it may advance.")
    min_requests: int = Field(
        100, ge=0, description="Requests the candidate must serve in a step before its checks count.",
    )
    interval_s: float = Field(30.0, gt=0, description="Seconds between two evaluations of the checks.")
    checks: RolloutChecksSpec = Field(default_factory=RolloutChecksSpec, description="Per-step checks.")
    failure_limit: int = Field(
        1, ge=1, description="Failed evaluations (over the whole rollout) that roll the candidate back.",
    )
    on_low_traffic: Literal["hold", "fail"] = Field(
        "hold",
        description="A step that reached min_step_s with too few requests (or no quality score): 'hold' "
        "waits up to max_hold_s more, then rolls back; 'fail' rolls back at once.",
    )
    max_hold_s: float = Field(3600.0, ge=0, description="Longest a step is held for traffic (on_low_traffic: hold).")
    candidate_start_timeout_s: float = Field(
        900.0, gt=0, description="Base-model rollouts (adapter: null): seconds the candidate's own engine (the Serve "
        "app <app>-candidate) may take to be RUNNING; past it, or when it fails to deploy, the rollout is rolled back.",
    )
    controller: Literal["cluster", "manual"] = Field(
        "cluster",
        description="Who decides the steps: 'cluster' = the serving app's replicas start the rollout's controller "
        "(a detached actor) on their own Ray cluster within seconds of the rollout appearing under the storage "
        "root; 'manual' = nothing decides until runtime.release.rollout_evaluate is called (notebooks, tests).",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        if any(s <= 0 or s > 100 for s in v):
            raise ValueError(f"each step is a traffic share in percent, above 0 and at most 100 (got {v})")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"steps must be strictly increasing (got {v}), e.g. [10, 50, 100]")
        if v[-1] != 100:
            raise ValueError(f"the last step must be 100 (the candidate takes all traffic before promotion); "
                             f"got {v}, e.g. {[*v, 100.0]}")
        return v


class OnlineInferenceSpec(SpecBase):
    """A served model (``kind: OnlineInference``): ray.serve.llm + vLLM behind raylane's ingress."""

    kind: Literal["OnlineInference"] = "OnlineInference"
    shape: ClassVar[Shape] = Shape(
        slug="serve", runner=_run_serving, kuberay="RayService", sizing="serve", model_field="model",
        serve_app="serve_apps.serve:build_serve_app", serve_config=_serve_config,
    )
    model: str = Field(description="Model folder, 'tiny', or registry alias models:/name@alias.")
    model_id: str | None = Field(None, description="Name clients send as 'model'; default = spec name.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served multiplexed as model='<model_id>:<key>': key -> adapter folder or "
        "registry alias models:/name@alias.",
    )
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank among the adapters.")
    max_adapters_per_replica: int = Field(4, ge=1, description="Adapters kept loaded per engine replica.")
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + completion) in tokens.")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask for; None = max_model_len."
    )
    dtype: str = Field("auto", description="Weights dtype for vLLM ('auto', 'bfloat16', 'float16', 'float32').")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    max_num_seqs: int = Field(64, ge=1, description="Sequences a replica decodes concurrently.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across requests sharing a prefix.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU bundles) one replica spans.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] | None = Field(
        None, description="Placement group strategy for a replica's bundles; None = PACK (STRICT_PACK with TP>1)."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to vLLM as is.")
    stream_batching_interval_ms: float = Field(
        20, ge=0, description="Streams to Serve deployment-handle callers only (HTTP clients get vLLM's own "
        "stream): after the first chunk, sent at once, batch chunks for this long (0 = send each chunk)."
    )
    tool_calling: ToolCallingSpec | None = Field(
        None, description="Tool calling (tools + tool_choice -> tool_calls); null = off (a request with a "
        "tool_choice other than 'none' gets 400)."
    )
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica autoscaling policy.")
    slo: SLOSpec | None = Field(None, description="Latency targets; with one, a warm replica is kept.")
    auth: Literal["api-key", "none"] = Field(
        "api-key",
        description="'api-key': Bearer keys from $RAYLANE_API_KEYS or the file $RAYLANE_API_KEYS_FILE. "
        "'none': open endpoint.",
    )
    rate_limit: RateLimitSpec | None = Field(
        default_factory=RateLimitSpec, description="Per-key request rate limit; null disables it."
    )
    extra_routes: list[Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9_./-]*$")]] = Field(
        default_factory=list,
        description="vLLM routes to serve beyond /v1/chat/completions, /v1/completions, /v1/models and /health "
        "(e.g. '/v1/responses', '/v1/embeddings', '/tokenize'); every other route answers 404.",
    )
    trusted_proxy_hops: int = Field(
        0, ge=0, le=8, description="Proxies in front of the endpoint that append the client address to "
        "X-Forwarded-For (a load balancer or Kubernetes ingress; Ray's HAProxy does not): rate limits count "
        "per that client. 0 = per TCP peer (behind a proxy, the proxy's address).",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address Serve's proxy binds for `raylane run` (a local run); the rendered Serve "
        "config and RayService bind 0.0.0.0 inside the cluster.",
    )
    rollout: RolloutSpec | None = Field(
        None, description="Canary release settings for `raylane rollout start` and a FineTune's release: "
        "(see README: Release); null = the defaults (the base model released, from models:/NAME@challenger).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy: `raylane run` and the "
                      "rendered Serve config / RayService.")

    @property
    def served_model_id(self) -> str:
        return self.model_id or self.name

    @property
    def served_model_ids(self) -> list[str]:
        """Every id clients may send as ``model``: the base model, then ``<id>:<adapter>`` each."""
        return [self.served_model_id] + [f"{self.served_model_id}:{a}" for a in self.adapters]

    @property
    def request_max_tokens(self) -> int:
        return self.max_tokens_limit or self.max_model_len

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not ADAPTER_NAME_RE.match(k)]
        if bad:
            raise ValueError(f"adapter names {bad} must be letters, digits, '_', '.', '-' (they become model ids)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        owned = sorted(k for k in self.engine_kwargs if k in OWNED_ENGINE_KEYS)
        if owned:
            problems.append(
                "engine_kwargs repeats settings the spec has as fields: "
                + ", ".join(f"{k} (use '{OWNED_ENGINE_KEYS[k]}')" for k in owned)
            )
        if self.max_tokens_limit and self.max_tokens_limit >= self.max_model_len:
            problems.append(f"max_tokens_limit ({self.max_tokens_limit}) must be below max_model_len ({self.max_model_len})")
        if ":" in self.served_model_id:
            problems.append("model_id must not contain ':' (it separates the base model from an adapter)")
        problems += rollout_problems(self, self.rollout) if self.rollout else []
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def release_target(self, rollout: RolloutSpec | None = None) -> tuple[str, str]:
        """(stable model id, champion ref) of what ``rollout`` releases: the base model or an adapter."""
        adapter = (rollout or self.rollout or RolloutSpec()).adapter
        if adapter is None:
            return self.served_model_id, self.model
        return f"{self.served_model_id}:{adapter}", self.adapters[adapter]


def rollout_problems(spec: OnlineInferenceSpec, rollout: RolloutSpec) -> list[str]:
    """What keeps ``rollout`` from running on ``spec``: each problem names the field and the fix."""
    from runtime.registry import REF_RE

    if rollout.adapter is None:  # the base model: its candidate gets an engine of its own
        field, ref = "model", spec.model
        champion = REF_RE.match(ref)
        if not champion or not champion["alias"]:
            return [f"rollout.adapter: null releases the base model, so 'model' must be a registry alias "
                    f"(e.g. 'models:/NAME@champion'), not {ref!r}: a release moves that alias; register the "
                    "model and serve its alias, or name the adapter to release (rollout.adapter)"]
    else:
        if rollout.adapter not in spec.adapters:
            known = ", ".join(spec.adapters) or "none declared"
            return [f"rollout.adapter: {rollout.adapter!r} is not a key of 'adapters' ({known}); name one"]
        field = f"adapters.{rollout.adapter}"
        ref = spec.adapters[rollout.adapter]
        champion = REF_RE.match(ref)
        if not champion or not champion["alias"]:
            return [f"rollout: {field} is {ref!r}; a release moves a registry alias, so {field} must be one, "
                    f"e.g. 'models:/NAME@champion'"]
    if rollout.candidate is not None:
        candidate = REF_RE.match(rollout.candidate)
        if not candidate:
            return [f"rollout.candidate: {rollout.candidate!r} is not a registry reference; use "
                    f"models:/{champion['name']}/VERSION or models:/{champion['name']}@ALIAS"]
        if candidate["name"] != champion["name"]:
            return [f"rollout.candidate: {rollout.candidate!r} names model {candidate['name']!r} but {field} "
                    f"is {champion['name']!r}; a candidate is another version of the same registered model "
                    f"(models:/{champion['name']}/VERSION)"]
        if candidate["alias"] == champion["alias"]:
            return [f"rollout.candidate: {rollout.candidate!r} is the champion itself ({field}); name the "
                    f"new version, e.g. models:/{champion['name']}@challenger"]
    return []
