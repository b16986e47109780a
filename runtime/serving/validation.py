"""Request checks the ingress makes before a request reaches an engine replica (cheap, no
tokenizer): known model id, sane ``max_tokens``. The engine checks the rest (prompt length
against ``max_model_len``) and its 400 passes through.

>>> check = request_validator({"name": "chat", "max_model_len": 512})
>>> check("/v1/completions", {"model": "chat", "max_tokens": 16})
"""

from __future__ import annotations

from typing import Any

from runtime.serving.guard import HTTPError


def request_validator(spec_dict: dict[str, Any]):
    """A body validator for ``GuardMiddleware`` from a dumped ``OnlineInferenceSpec``."""
    base = spec_dict.get("model_id") or spec_dict["name"]
    served = {base} | {f"{base}:{a}" for a in spec_dict.get("adapters", {})}
    limit = spec_dict.get("max_tokens_limit") or spec_dict.get("max_model_len", 2048)
    max_model_len = spec_dict.get("max_model_len", 2048)
    tools_on = bool(spec_dict.get("tool_calling"))

    def validate(path: str, body: Any) -> None:
        if not path.startswith("/v1/"):
            return
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in served:
            raise HTTPError(404, f"model {model!r} does not exist; served models: {sorted(served)}",
                            "not_found_error", "model")
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HTTPError(400, f"{name} must be a positive integer", param=name)
            if value > limit:
                what = "max_model_len" if limit == max_model_len else "max_tokens_limit"
                raise HTTPError(400, f"{name}={value} is over this endpoint's limit of {limit} tokens ({what})",
                                param=name)
        if not tools_on and body.get("tools") and body.get("tool_choice", "auto") != "none":
            # vLLM would answer with its own CLI flags (--tool-call-parser); name the spec field.
            raise HTTPError(400, "tool calling is off on this endpoint; the spec needs tool_calling: {parser: ...} "
                            "(send tool_choice='none' to pass tools without calls)", param="tool_choice")

    return validate
