"""Quickstart stage: serve the tiny model (with the fine-tuned adapter when the quickstart made
one, through its registry alias) behind raylane's ingress and stream one chat reply. The app stays
up for the release stage (``runtime.release.quickstart``), which ends it; without an adapter it
ends here."""

from __future__ import annotations

import json
import os
import secrets
import time

from runtime.log import note
from runtime.serving import start_serving
from runtime.specs import parse_spec

CLIENT_KEYS = 16  # API keys of the quickstart's clients


def stage_serve(ctx) -> dict:
    import httpx

    # Keys of our own for this local endpoint: the release stage's clients each need one (a
    # canary's arm is sticky per key), beside any the user exported.
    own = [f"qs-{secrets.token_hex(8)}" for _ in range(CLIENT_KEYS)]
    mine = [k.strip() for k in os.environ.get("RAYLANE_API_KEYS", "").split(",") if k.strip()]
    os.environ["RAYLANE_API_KEYS"] = ",".join([*mine, *own])
    ctx.api_keys = own
    key = own[0]
    registered = ((ctx.results.get("train") or {}).get("finetune") or {}).get("registry") or {}
    if ctx.adapter_dir and registered.get("alias") == "champion":  # what a rollout releases into
        adapters = {"tuned": f"models:/{registered['name']}@champion"}
    else:
        adapters = {"tuned": str(ctx.adapter_dir)} if ctx.adapter_dir else {}
    spec = parse_spec({
        "kind": "OnlineInference", "name": "quickstart-chat", "model": str(ctx.model_dir), "model_id": "tiny",
        "adapters": adapters, "max_model_len": 512, "max_num_seqs": 8,
        "storage": {"root": str(ctx.workdir)}, "slo": {"ttft_ms_p95": 1000},
    })
    served = start_serving(spec, port=0)
    model = "tiny:tuned" if adapters else "tiny"
    keep = adapters.get("tuned", "").startswith("models:/")
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
        if keep:
            ctx.serving = (spec, served.url)
        return {"url": served.url, "model": model, "adapter": bool(adapters), "reply": reply,
                "ttft_ms": round((ttft or 0) * 1000, 1), "request_id": request_id,
                "ready_seconds": served.ready_seconds, "adapter_ref": adapters.get("tuned")}
    finally:
        if not keep or ctx.serving is None:
            stop_serving(spec.name)


def stop_serving(name: str) -> None:
    from ray import serve

    serve.delete(name)
    # Serve keeps its HTTP options (the port) until it shuts down; later stages start their own.
    serve.shutdown()
