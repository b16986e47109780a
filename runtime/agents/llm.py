"""The agent's model: any OpenAI-compatible URL, or a co-located Serve LLM app through a handle.

>>> llm = OpenAIClient("http://127.0.0.1:8000/v1", model="tiny")            # doctest: +SKIP
>>> reply = await llm.chat(messages, schema=ACTION_SCHEMA, max_tokens=128)  # doctest: +SKIP
>>> reply.content, reply.tokens_in, reply.tokens_out                        # doctest: +SKIP

Both implement one method, ``chat``. Tool calls are guided by vLLM structured outputs: the
request carries ``structured_outputs: {json: <schema>}`` so the engine can only emit text the
action schema accepts (vLLM 0.29; both the OpenAI server and ``ray.serve.llm`` pass it through).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class LLMReply:
    content: str
    tokens_in: int
    tokens_out: int
    seconds: float
    finish_reason: str | None = None

    @classmethod
    def from_completion(cls, d: dict, seconds: float) -> LLMReply:
        """The reply in an OpenAI chat-completion response body."""
        choice = d["choices"][0]
        usage = d.get("usage") or {}
        return cls(choice["message"].get("content") or "", usage.get("prompt_tokens", 0),
                   usage.get("completion_tokens", 0), seconds, choice.get("finish_reason"))


class LLMError(Exception):
    """The model call failed (HTTP error, timeout, engine error); recorded as a failed step."""


class LLMClient(Protocol):
    async def warm(self) -> None: ...

    async def chat(self, messages: list[dict], *, schema: dict | None, max_tokens: int,
                   temperature: float, timeout_s: float) -> LLMReply: ...


def request_body(model: str, messages: list[dict], schema: dict | None, max_tokens: int, temperature: float) -> dict:
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": temperature}
    if schema is not None:
        body["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
    return body


class OpenAIClient:
    """POST /chat/completions on an OpenAI-compatible server (vLLM, ray.serve.llm, others)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=None,
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def warm(self) -> None:
        await self._model()

    async def _model(self) -> str:
        if self.model is None:
            r = await self._http.get(f"{self.base_url}/models", timeout=30)
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        return self.model

    async def chat(self, messages, *, schema, max_tokens, temperature, timeout_s) -> LLMReply:
        import httpx

        t0 = time.perf_counter()
        try:
            body = request_body(await self._model(), messages, schema, max_tokens, temperature)
            r = await self._http.post(f"{self.base_url}/chat/completions", json=body, timeout=timeout_s)
        except httpx.TimeoutException:
            raise LLMError(f"LLM call timed out after {timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise LLMError(f"LLM call to {self.base_url} failed: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise LLMError(f"LLM call returned HTTP {r.status_code}: {r.text[:300]}")
        d = r.json()
        return LLMReply.from_completion(d, time.perf_counter() - t0)


class ServeHandleClient:
    """Calls the ``LLMServer`` deployment of a co-located ``ray.serve.llm`` app directly
    (no HTTP hop, no proxy): the request object is the same ChatCompletionRequest the
    OpenAI ingress would build."""

    def __init__(self, app_name: str, model_id: str):
        self.app_name = app_name
        self.model = model_id
        self._handle = None

    def _get(self):
        if self._handle is None:
            from ray import serve

            # The engine deployment is the app's one non-ingress deployment (its class name
            # depends on the server_cls the LLM app uses).
            deployments = serve.status().applications[self.app_name].deployments
            name = next(d for d in deployments if "Ingress" not in d)
            self._handle = serve.get_deployment_handle(name, app_name=self.app_name).options(stream=True)
        return self._handle

    async def warm(self) -> None:
        # Importing the request model pulls in vLLM's protocol (seconds): do it before the first step.
        from ray.serve.llm.openai_api_models import ChatCompletionRequest  # noqa: F401

        self._get()

    async def chat(self, messages, *, schema, max_tokens, temperature, timeout_s) -> LLMReply:
        import asyncio

        t0 = time.perf_counter()
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        req = ChatCompletionRequest(**request_body(self.model, messages, schema, max_tokens, temperature))

        async def first():
            async for item in self._get().chat.remote(req):
                return item
            raise LLMError("the LLM deployment returned nothing")

        try:
            resp = await asyncio.wait_for(first(), timeout_s)
        except TimeoutError:
            raise LLMError(f"LLM call timed out after {timeout_s:g} s") from None
        except LLMError:
            raise
        except Exception as e:
            raise LLMError(f"LLM deployment {self.app_name}: {type(e).__name__}: {e}") from None
        if isinstance(resp, list):  # stream-style batches: not expected for stream=False
            resp = resp[0]
        d = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
        if "choices" not in d:
            raise LLMError(f"LLM deployment error: {str(d)[:300]}")
        return LLMReply.from_completion(d, time.perf_counter() - t0)


def make_client(llm_cfg: dict) -> LLMClient:
    """The client a session worker uses, from the plain-dict form of the spec's ``llm:``."""
    if llm_cfg.get("serve_app"):
        return ServeHandleClient(llm_cfg["serve_app"], llm_cfg["model_id"])
    key = os.environ.get(llm_cfg["api_key_env"]) if llm_cfg.get("api_key_env") else None
    return OpenAIClient(llm_cfg["url"], llm_cfg.get("model_id"), key)
