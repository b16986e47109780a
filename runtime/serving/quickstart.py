"""Quickstart stage: serve the tiny model (with the fine-tuned adapter when the quickstart made
one) behind raylane's ingress and stream one chat reply."""

from __future__ import annotations

import json
import os
import secrets
import time

from runtime.log import note
from runtime.serving import start_serving
from runtime.specs import parse_spec


def stage_serve(ctx) -> dict:
    import httpx
    from ray import serve

    key = os.environ.get("RAYLANE_API_KEYS", "").split(",")[0].strip()
    if not key:
        key = f"qs-{secrets.token_hex(8)}"
        os.environ["RAYLANE_API_KEYS"] = key
    adapters = {"tuned": str(ctx.adapter_dir)} if ctx.adapter_dir else {}
    spec = parse_spec({
        "kind": "OnlineInference", "name": "quickstart-chat", "model": str(ctx.model_dir), "model_id": "tiny",
        "adapters": adapters, "max_model_len": 512, "max_num_seqs": 8,
        "storage": {"root": str(ctx.workdir)}, "slo": {"ttft_ms_p95": 1000},
    })
    served = start_serving(spec, port=0)
    model = "tiny:tuned" if adapters else "tiny"
    try:
        t0 = time.perf_counter()
        ttft, parts = None, []
        with httpx.Client(base_url=served.url, timeout=120) as c, c.stream(
            "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": model, "messages": [{"role": "user", "content": "Hello, Ray!"}],
                  "max_tokens": 24, "stream": True},
        ) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"chat request failed: {r.status_code} {r.text[:300]}")
            request_id = r.headers.get("x-request-id")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
                if delta and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(delta)
        reply = "".join(parts)
        note("quickstart", f"  {model} -> {reply!r}")
        return {"url": served.url, "model": model, "adapter": bool(adapters), "reply": reply,
                "ttft_ms": round((ttft or 0) * 1000, 1), "request_id": request_id,
                "ready_seconds": served.ready_seconds}
    finally:
        serve.delete(spec.name)
        # Serve keeps its HTTP options (the port) until it shuts down; later stages start their own.
        serve.shutdown()
