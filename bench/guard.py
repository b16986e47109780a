"""Micro-benchmark of raylane's guard: what GuardMiddleware adds to one request, called directly
over a trivial ASGI app that streams 33 chunks (no HTTP, no engine), so only the guard's own
work is timed: auth (with the failed-auth limiter), route allow-list, rate limit, body parse
(NaN and depth checks), validation (with the default max_tokens spliced in) and the request id.

    python -m bench.guard                  # 5000 requests per configuration, best of 3
    python -m bench.guard --requests 20000

Prints microseconds per request for the bare app and for the guard configured as each serving
replica configures it (RaylaneGuard, from an OnlineInference spec), with and without a rate limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

BODY = json.dumps({"model": "tiny", "prompt": "Ray Serve and vLLM serve this benchmark prompt", "stream": True,
                   "temperature": 0, "ignore_eos": True}).encode()  # no max_tokens: the default is spliced in
HEADERS = [(b"host", b"127.0.0.1:8000"), (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate"),
           (b"connection", b"keep-alive"), (b"user-agent", b"python-httpx/0.28.1"),
           (b"authorization", b"Bearer bench-key"), (b"content-type", b"application/json"),
           (b"content-length", str(len(BODY)).encode())]


async def streaming_app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for _ in range(32):
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _per_request_us(app, requests: int, warmup: int = 200) -> float:
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    t0 = 0.0
    for i in range(warmup + requests):
        if i == warmup:
            t0 = time.perf_counter()
        pending = [{"type": "http.request", "body": BODY, "more_body": False}]

        async def receive(pending=pending):
            return pending.pop() if pending else {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": HEADERS,
                 "client": ("127.0.0.1", 50000)}
        await app(scope, receive, send)
    elapsed = time.perf_counter() - t0
    if set(statuses) != {200}:
        raise RuntimeError(f"the guard refused benchmark requests: statuses {sorted(set(statuses))}")
    return elapsed / requests * 1e6


def guards() -> dict[str, object]:
    from runtime.serving.guard import GuardMiddleware, KeySource, RateLimiter
    from runtime.serving.validation import request_validator, served_routes
    from runtime.specs import parse_spec

    os.environ["RAYLANE_API_KEYS"] = "bench-key"
    os.environ.pop("RAYLANE_API_KEYS_FILE", None)
    spec = parse_spec({"kind": "OnlineInference", "name": "bench", "model": "tiny", "model_id": "tiny",
                       "max_model_len": 512, "max_tokens_limit": 32})

    def guard(limiter):  # what runtime.serving.app.RaylaneGuard builds, without importing Ray Serve
        return GuardMiddleware(streaming_app, keys=KeySource(), limiter=limiter,
                               validate_body=request_validator(spec), unavailable=lambda: False,
                               routes=served_routes(spec), trusted_proxy_hops=spec.trusted_proxy_hops)

    return {
        "bare app": streaming_app,
        "guard, rate_limit: null": guard(None),
        # A limit no benchmark reaches: the bucket is checked and refilled on every request.
        "guard, rate limit": guard(RateLimiter(1e9, 10**9)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the best is reported")
    a = p.parse_args(argv)
    apps = guards()
    best = {name: min(asyncio.run(_per_request_us(app, a.requests)) for _ in range(a.repeats))
            for name, app in apps.items()}
    base = best["bare app"]
    print(f"\nGuardMiddleware per request ({a.requests} requests, best of {a.repeats}, load average "
          f"{os.getloadavg()[0]:.2f})\n")
    print("| configuration | µs per request | guard's own µs |\n|---|---|---|")
    for name, us in best.items():
        print(f"| {name} | {us:.1f} | {'-' if name == 'bare app' else f'{us - base:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
