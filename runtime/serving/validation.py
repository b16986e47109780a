"""Request checks the ingress makes before a request reaches an engine replica (cheap, no
tokenizer): the served routes, a known model id, token limits that a request cannot dodge (an
absent ``max_tokens`` becomes ``max_tokens_limit``), and caps on the fields that multiply work
(``n``, ``best_of``, prompt arrays, ``stop``). The engine checks the rest (prompt length against
``max_model_len``) and its 400 passes through.

>>> from runtime.specs import parse_spec
>>> spec = parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "max_model_len": 512,
...                    "max_tokens_limit": 64, "auth": "none"})
>>> check = request_validator(spec)
>>> check("/v1/completions", {"model": "chat", "prompt": "hi", "max_tokens": 16})
>>> check("/v1/completions", {"model": "chat", "prompt": "hi"})
{'max_tokens': 64}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.serving.guard import HTTPError, Routes

# The routes raylane serves from vLLM's app; a spec adds others with ``extra_routes``.
SERVED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health")
SERVED_PREFIXES = ("/v1/models/",)  # GET /v1/models/{id}
# Per request: choices (n, best_of), prompts in a batched ``prompt``, and stop sequences.
MAX_CHOICES = 16
MAX_PROMPTS = 256
MAX_STOP = 16
MAX_STOP_CHARS = 256
# Where an absent output-token limit is filled in, per generating route, and every field that
# limits output tokens on some route.
DEFAULT_TOKEN_FIELD = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/invocations": ("max_tokens", "max_completion_tokens"),
}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def served_routes(spec) -> Routes:
    """The allow-list for ``spec``: raylane's routes plus ``spec.extra_routes``."""
    return Routes([*SERVED_ROUTES, *spec.extra_routes], SERVED_PREFIXES)


@dataclass(frozen=True)
class RequestLimits:
    """What the validator enforces, read once from an ``OnlineInferenceSpec``."""

    served: frozenset[str]
    max_tokens: int  # the largest output-token count a request may ask for
    limit_name: str  # the spec field that sets it (for the error message)
    default_max_tokens: int | None  # filled in when a request names none (spec.max_tokens_limit)
    max_model_len: int
    tools_on: bool  # spec.tool_calling is set (vLLM's auto tool choice and parser)

    @classmethod
    def from_spec(cls, spec) -> RequestLimits:
        base = spec.served_model_id
        return cls(
            served=frozenset({base} | {f"{base}:{a}" for a in spec.adapters}),
            max_tokens=spec.request_max_tokens,
            limit_name="max_tokens_limit" if spec.max_tokens_limit else "max_model_len",
            default_max_tokens=spec.max_tokens_limit,
            max_model_len=spec.max_model_len,
            tools_on=spec.tool_calling is not None,
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def request_validator(spec):
    """A body validator for ``GuardMiddleware`` from an ``OnlineInferenceSpec``: raises
    ``HTTPError`` for a bad request, returns fields to add (the default token limit) or None."""
    lim = RequestLimits.from_spec(spec)

    def validate(path: str, body: Any) -> dict[str, Any] | None:
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise HTTPError(400, "model must be a string", param="model")
            if model not in lim.served:
                raise HTTPError(404, f"model {model[:200]!r} does not exist; served models: {sorted(lim.served)}",
                                "not_found_error", "model")
        named = False
        for name in TOKEN_FIELDS:
            value = body.get(name)
            if value is None:
                continue
            named = True
            if not _positive_int(value):
                raise HTTPError(400, f"{name} must be a positive integer", param=name)
            if value > lim.max_tokens:
                raise HTTPError(400, f"{name}={value} is over this endpoint's limit of {lim.max_tokens} tokens "
                                f"({lim.limit_name})", param=name)
        if not lim.tools_on and body.get("tools") and body.get("tool_choice", "auto") != "none":
            # vLLM would answer with its own CLI flags (--tool-call-parser); name the spec field.
            raise HTTPError(400, "tool calling is off on this endpoint; the spec needs tool_calling: {parser: ...} "
                            "(send tool_choice='none' to pass tools without calls)", param="tool_choice")
        for name in ("n", "best_of"):
            value = body.get(name)
            if value is not None and not (_positive_int(value) and value <= MAX_CHOICES):
                raise HTTPError(400, f"{name} must be an integer from 1 to {MAX_CHOICES}", param=name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            if isinstance(prompt[0], int):  # one prompt as token ids
                if len(prompt) > lim.max_model_len:
                    raise HTTPError(400, f"prompt has {len(prompt)} tokens, over max_model_len "
                                    f"({lim.max_model_len})", param="prompt")
            elif len(prompt) > MAX_PROMPTS:
                raise HTTPError(400, f"prompt is a batch of {len(prompt)} prompts; at most {MAX_PROMPTS} per request",
                                param="prompt")
        _check_stop(body.get("stop"))
        stop_ids = body.get("stop_token_ids")
        if isinstance(stop_ids, list) and len(stop_ids) > MAX_STOP:
            raise HTTPError(400, f"stop_token_ids has {len(stop_ids)} entries; at most {MAX_STOP}",
                            param="stop_token_ids")
        if not named and lim.default_max_tokens is not None:
            fields = DEFAULT_TOKEN_FIELD.get(path)
            if fields:
                return {fields[0]: lim.default_max_tokens}
        return None

    return validate


def _check_stop(stop: Any) -> None:
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise HTTPError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise HTTPError(400, f"stop has {len(stops)} sequences; at most {MAX_STOP}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise HTTPError(400, f"a stop sequence is over {MAX_STOP_CHARS} characters", param="stop")
