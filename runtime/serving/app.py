"""The online-inference Serve application: ``ray.serve.llm``'s direct-streaming shape, where each
engine replica is its own HTTP ingress serving vLLM's OpenAI app, with raylane's guard (API keys,
rate limit, request validation, request ids) as the outermost middleware of that app and engine
metrics feeding the queue-depth autoscaler.

Request path: client -> HAProxy (``RAY_SERVE_ENABLE_HA_PROXY=1``, set by ``runtime.ray_env`` for
local clusters and by the KubeRay manifests) -> the replica's own HTTP port -> guard -> vLLM. No
Ray hop carries a token. Without HAProxy, Serve's Python proxy forwards to the same replica app
(one Ray hop), so the app is correct on any Serve cluster, only slower.

>>> from runtime.specs import load_spec
>>> from runtime.serving.app import build_app
>>> app = build_app(load_spec("examples/serve.yaml"))    # doctest: +SKIP
>>> serve.run(app)                                       # doctest: +SKIP

This module imports Ray Serve at import time (it subclasses its classes); import it lazily.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ray import serve
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.server.llm_server import _add_middleware_to_built_app
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from runtime.errors import RaylaneError
from runtime.models import resolve_model
from runtime.serving import canary
from runtime.serving import config as cfg
from runtime.serving.autoscaling import KV_USAGE, RUNNING, WAITING
from runtime.serving.guard import GuardMiddleware, HTTPError, replay_body
from runtime.serving.health import StallDetector
from runtime.serving.keys import KeySource, key_source_warnings, load_api_keys, replica_key_env
from runtime.serving.ratelimit import limiter_for
from runtime.serving.streaming import first_then_batched
from runtime.serving.validation import RequestLimits, request_validator, served_routes
from runtime.specs import dump_spec, parse_spec

# How often a replica re-checks where a registry-alias adapter points (promotion latency).
ADAPTER_REFRESH_S = 5.0


class EngineStats:
    """A vLLM stat logger that keeps the latest scheduler numbers for the autoscaler."""

    def __init__(self):
        self.waiting = 0
        self.running = 0
        self.kv_usage = 0.0
        self.last_step = time.monotonic()  # the engine's progress, for the stall probe

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        self.last_step = time.monotonic()
        if scheduler_stats is not None:
            self.waiting = scheduler_stats.num_waiting_reqs
            self.running = scheduler_stats.num_running_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage

    def log(self):
        pass

    def log_engine_initialized(self):
        pass

    def record_sleep_state(self, *args, **kwargs):
        pass


class AdapterResolver:
    """Where each adapter's weights are now: ``adapters[name]`` is a folder or a registry alias
    (``models:/support-bot@champion``), re-resolved at most every ``ttl_s`` so that promoting a
    new champion reaches running replicas with no redeploy."""

    def __init__(self, adapters: dict[str, str], storage_root: str, ttl_s: float = ADAPTER_REFRESH_S):
        self.adapters = adapters
        self.storage_root = storage_root
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str]] = {}

    async def path(self, lora_model_id: str) -> str:
        import asyncio
        import time

        name = lora_model_id.partition(":")[2]
        ref = self.adapters.get(name) or canary.candidate_ref(name, self.adapters)  # a rollout's candidate
        if ref is None:
            raise HTTPError(404, f"model {lora_model_id!r} does not exist", "not_found_error", "model")
        hit = self._cache.get(name)
        if hit and (time.monotonic() - hit[0] < self.ttl_s or not ref.startswith("models:/")):
            return hit[1]
        path = await asyncio.to_thread(_resolve_adapter, ref, self.storage_root, name)
        self._cache[name] = (time.monotonic(), path)
        return path


class AdapterLoader(LoraModelLoader):
    """Serve's multiplexed-model loader for raylane adapters (ray.serve.llm's own reads only
    s3/gs/azure): the adapter's current local folder."""

    def __init__(self, resolver: AdapterResolver, **kwargs):
        super().__init__(**kwargs)
        self.resolver = resolver

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        return _disk_config(lora_model_id, await self.resolver.path(lora_model_id), llm_config)


def _disk_config(lora_model_id: str, path: str, llm_config) -> DiskMultiplexConfig:
    from ray.llm._internal.serve.utils.lora_serve_utils import global_id_manager

    return DiskMultiplexConfig.model_validate({
        "model_id": lora_model_id, "max_total_tokens": llm_config.engine_kwargs.get("max_model_len"),
        "local_path": path, "lora_assigned_int_id": global_id_manager.next(),
    })


def _resolve_adapter(ref: str, storage_root: str, name: str) -> str:
    path = Path(resolve_model(ref, storage_root))
    if not (path / "adapter_config.json").is_file():
        raise RaylaneError(f"adapters.{name}: {ref!r} is not a LoRA adapter (no adapter_config.json)",
                           hint="point at a peft adapter folder or its registry alias")
    return str(path)


class RaylaneLLMServer(LLMServer):
    """``LLMServer`` serving vLLM's OpenAI app behind raylane's guard; it reports engine queue
    depth and KV-cache usage to Serve's autoscaler and loads LoRA adapters from local folders or
    the registry."""

    async def __init__(self, llm_config, *, spec: dict[str, Any], adapters: dict[str, str] | None = None,
                       storage_root: str = "", **kwargs):
        import asyncio

        self._spec = parse_spec(spec, source="RaylaneLLMServer spec")  # once; the guard reads typed fields
        if self._spec.auth == "api-key":
            load_api_keys()  # raises AuthNotConfigured: the replica fails instead of serving openly
        self._served = RequestLimits.from_spec(self._spec).served
        self._resolver = AdapterResolver(adapters, storage_root) if adapters else None
        self._storage_root = storage_root
        # Rollouts run on this app when it serves an adapter or a base model from a registry alias.
        self._releases = bool(adapters) or _is_alias(self._spec.model)
        self._built_app = None
        self._lora_lock = asyncio.Lock()
        if self._resolver:
            kwargs["model_downloader"] = functools.partial(AdapterLoader, self._resolver)
        # One limiter per replica; its shared store is reached while the engine loads.
        self._limiter = limiter_for(self._spec.rate_limit, self._spec.name)
        store_ready = asyncio.ensure_future(self._limiter.start()) if hasattr(self._limiter, "start") else None
        await super().__init__(llm_config, **kwargs)
        if store_ready is not None:
            await store_ready
        if self._releases and storage_root:  # rollouts: their controller runs on this cluster
            from runtime.release.supervisor import supervise

            self._supervisor = asyncio.ensure_future(supervise(self._spec.name, storage_root))

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        if self._releases and self._storage_root:  # rollouts: inside the guard, so after auth and validation
            _add_middleware_to_built_app(
                app, canary.CanaryRouter, watch=canary.RolloutWatch(self._storage_root, self._spec.name),
                recorder=canary.ArmRecorder(self._storage_root, self._spec.name),
                ensure=self._ensure_adapter if self._resolver is not None else None)
        # Added last, so outermost: auth and rate limit run before anything parses the body.
        _add_middleware_to_built_app(app, RaylaneGuard, spec=self._spec, prepare=self._prepare_request,
                                     unavailable=self._engine_dead, limiter=self._limiter)
        self._built_app = app
        return app

    async def forward_asgi(self, scope: dict, body: bytes):
        """A request forwarded by another app's replica through a deployment handle (a base-model
        rollout's candidate arm, ``runtime.serving.canary``): the ASGI messages of serving it here,
        below this app's guard (the forwarding replica's guard authenticated, rate limited and
        validated it). Only a handle can call this: it is no HTTP route."""
        import asyncio

        if self._built_app is None:
            raise RuntimeError("this replica's app is not built yet")
        queue: asyncio.Queue = asyncio.Queue()

        async def no_disconnect():  # the caller ends by dropping the stream
            await asyncio.Event().wait()

        receive = replay_body(body, no_disconnect)

        async def send(message):
            await queue.put(dict(message))

        scope = {**scope, "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])],
                 FORWARDED: FORWARDED_MARK, "state": {}}
        task = asyncio.ensure_future(self._built_app(scope, receive, send))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    message = get.result()
                    yield message
                    if message["type"] == "http.response.body" and not message.get("more_body", False):
                        return
                else:
                    get.cancel()
                    while not queue.empty():
                        yield queue.get_nowait()
                    task.result()  # raises what the app raised
                    return
        finally:
            if not task.done():
                task.cancel()

    def _engine_dead(self) -> bool:
        """vLLM's engine process is gone (OOM kill, crash) or stalled: this replica can only fail
        until Serve's health check replaces it, so its requests get 503 "retry" at once."""
        client = getattr(self.engine, "_engine_client", None)
        stall = getattr(self, "_stall", None)
        return bool(getattr(client, "errored", False)) or bool(stall and stall.stalled)

    async def check_health(self) -> None:
        """vLLM's own check (the engine process is up), then progress: an engine that took no step
        lately must answer a one-token request (``runtime.serving.health``)."""
        await super().check_health()
        stall = getattr(self, "_stall", None)
        if stall is not None:
            await stall.check()

    async def _probe_engine(self) -> None:
        from vllm import SamplingParams

        client = self.engine._engine_client
        async for _ in client.generate("ping", SamplingParams(max_tokens=1), request_id=f"raylane-health-{uuid.uuid4().hex}"):
            pass

    def _stop_stalled_engine(self) -> None:
        """SIGKILL the stuck engine process (and its workers): vLLM then fails the requests in
        flight on it (503 "retry" through the guard) instead of leaving them hanging."""
        import psutil

        me = psutil.Process()
        for p in me.children(recursive=True):
            try:
                if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                    for q in [*p.children(recursive=True), p]:
                        q.kill()
            except psutil.Error:
                pass

    async def _prepare_request(self, path: str, body: Any) -> None:
        """Load the adapter a request names (``model="base:adapter"``) before vLLM sees it."""
        model = body.get("model") if isinstance(body, dict) else None
        # Only a served adapter id: any other string must never register a new LoRA id.
        if self._resolver is not None and isinstance(model, str) and ":" in model and model in self._served:
            await self._ensure_adapter(model)

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if not model_id or self._resolver is None:
            return await super()._maybe_resolve_lora_from_multiplex()
        await self._ensure_adapter(model_id)

    async def _ensure_adapter(self, model_id: str) -> None:
        await self._load_model(model_id)  # Serve's multiplexing bookkeeping (LRU per replica)
        path = await self._resolver.path(model_id)
        models = self.engine._oai_models
        loaded = models.lora_requests.get(model_id)
        if loaded is not None and loaded.lora_path == path:
            return
        async with self._lora_lock:
            loaded = models.lora_requests.get(model_id)
            if loaded is not None and loaded.lora_path == path:
                return
            if loaded is not None:
                # The alias moved (a new champion): swap the adapter under the same model id.
                from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

                await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=model_id))
            await self.engine.resolve_lora(_disk_config(model_id, path, self._llm_config))

    async def start(self):
        self._stats = EngineStats()
        await super().start()
        client = getattr(self.engine, "_engine_client", None)
        manager = getattr(client, "logger_manager", None)
        if manager is not None:
            # vLLM's AsyncLLM has no add_logger yet; its manager fans record() out to this list.
            manager.stat_loggers.append(self._stats)
            self._stall = StallDetector(self._probe_engine, lambda: self._stats.last_step,
                                        self._stop_stalled_engine)

    def _batch_output_stream(self, generator):
        # Deployment-handle callers (not HTTP): first chunk at once, the rest batched.
        return first_then_batched(generator, (self._get_batch_interval_ms() or 0) / 1000)

    def record_autoscaling_stats(self) -> dict[str, float]:
        s = getattr(self, "_stats", None) or EngineStats()
        return {WAITING: float(s.waiting), RUNNING: float(s.running), KV_USAGE: float(s.kv_usage)}


# A request ``forward_asgi`` runs carries this object under this scope key; only code in this
# process can put it there (an ASGI scope is not something a client sends), so the guard passes
# exactly the requests another replica's guard has checked already.
FORWARDED = "raylane.forwarded"
FORWARDED_MARK = object()


def _is_alias(model: str) -> bool:
    from runtime.registry import REF_RE

    m = REF_RE.match(model or "")
    return bool(m and m["alias"])


class RaylaneGuard(GuardMiddleware):
    """``GuardMiddleware`` configured from an ``OnlineInferenceSpec``; built inside the replica,
    so keys are read from that process's environment or keys file, never shipped in config."""

    async def __call__(self, scope, receive, send):
        if scope.get(FORWARDED) is FORWARDED_MARK:
            return await self.app(scope, receive, send)
        return await super().__call__(scope, receive, send)

    def __init__(self, app, spec, prepare=None, unavailable=None, limiter=None):
        super().__init__(
            app, keys=KeySource() if spec.auth == "api-key" else None,
            limiter=limiter if limiter is not None else limiter_for(spec.rate_limit, spec.name),
            validate_body=request_validator(spec), prepare=prepare, unavailable=unavailable,
            routes=served_routes(spec), trusted_proxy_hops=spec.trusted_proxy_hops)


def check_tool_parser(spec, model_source: str) -> None:
    """``tool_calling.parser`` names a vLLM tool-call parser that fits the model's tokenizer.
    Checked here (vLLM is imported already) because vLLM itself finds out late: an unknown name
    fails the replica after the engine loaded, and a parser whose special tokens the tokenizer
    lacks (``llama3_json`` needs ``<|python_tag|>``) fails every tool request with a 500."""
    import difflib

    if spec.tool_calling is None:
        return
    from vllm.tool_parsers import ToolParserManager

    name, known = spec.tool_calling.parser, sorted(ToolParserManager.list_registered())
    if name not in known:
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        raise RaylaneError(f"tool_calling.parser: {name!r} is not a vLLM tool-call parser"
                           + (f"; did you mean {guess[0]!r}?" if guess else ""),
                           hint=f"use the parser of the model's family, one of: {', '.join(known)}")
    if not Path(model_source, "tokenizer_config.json").is_file():
        return  # a remote model: its tokenizer is first read by the replica
    from transformers import AutoTokenizer

    try:
        parser_cls = ToolParserManager.get_tool_parser(name)
        tokenizer = AutoTokenizer.from_pretrained(model_source)
    except Exception:  # an optional dependency or an unusual tokenizer: vLLM reports it itself
        return
    try:
        parser_cls(tokenizer)
    except RuntimeError as e:  # vLLM's parsers raise this for missing special tokens
        raise RaylaneError(f"tool_calling.parser: {name!r} does not fit this model's tokenizer: {e}",
                           hint="use the tool-call parser of the model's family (see its model card)") from None


def build_app(spec, deployment_config: dict[str, Any] | None = None):
    """The Serve application for ``spec`` (an ``OnlineInferenceSpec``); ``deployment_config``
    overrides Serve deployment options (a rollout's champion redeploy surges)."""
    if spec.auth == "api-key":
        load_api_keys()  # refuse to start before loading any model
        for warning in key_source_warnings():
            logging.getLogger(__name__).warning("%s", warning)
    model_source = resolve_model(spec.model, spec.storage.root)
    for name, ref in spec.adapters.items():
        _resolve_adapter(ref, spec.storage.root, name)  # fail here, not on the first request
    check_tool_parser(spec, model_source)
    options = cfg.llm_config(spec, model_source)
    if spec.auth == "api-key":
        # Ray workers inherit the cluster's environment, not this process's: tell the replicas
        # where the keys are. Only a file path ever travels (a runtime env is visible in the
        # Serve API, actor listings and logs); see replica_key_env.
        options["runtime_env"]["env_vars"].update(replica_key_env())
    if os.environ.get(canary.FAULTS_ENV):  # test-only fault injection (see runtime.serving.canary)
        options["runtime_env"]["env_vars"][canary.FAULTS_ENV] = os.environ[canary.FAULTS_ENV]
    if deployment_config:
        options["deployment_config"].update(deployment_config)
    llm = LLMConfig(**options)
    bind = {"spec": dump_spec(spec)}
    if spec.adapters:
        bind.update(adapters=dict(spec.adapters), storage_root=spec.storage.root)
    elif _is_alias(spec.model):  # a base-model rollout may run on it
        bind.update(storage_root=spec.storage.root)
    # The engine replica is the ingress (ray.serve.llm's direct streaming, whose late-bound ASGI
    # app is vLLM's). No ingress request router and Serve's default replica router: HAProxy
    # balances over the replicas with its own algorithm, and every replica can load any adapter.
    return build_llm_deployment(llm, bind_kwargs=bind, deployment_cls=serve.ingress()(RaylaneLLMServer))
