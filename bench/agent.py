"""Agent orchestration overhead and concurrency, against the bare engine in the same run.

    python -m bench.agent [--sessions 100] [--steps-sessions 20]

Starts a vLLM OpenAI server on the tiny model (guided JSON, compact) and the agent app on a
local Ray cluster pointed at it (calculator tool; every turn = tool step + answer step), then:

1. per-step orchestration overhead: step wall time minus the LLM call and the tool's own run
   time (prompt assembly, schema, parsing, Ray task dispatch, the store write, tracing), from
   sequential sessions; goal p50 <= 5 ms;
2. N concurrent sessions over HTTP (one message each) vs the same number of bare chat calls
   sent to the engine at the same concurrency.

Prints a markdown table. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.serving.deploy import free_port


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def start_vllm(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
         "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--enforce-eager",
         "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited; see {log}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("vLLM not ready")


async def bare_calls(url: str, n: int, prompt: str) -> tuple[float, list[float]]:
    """n concurrent chat calls with the same guided schema the agent's first step uses."""
    import httpx

    from runtime.agents.loop import action_schema
    from runtime.agents.tools import load_tools
    from runtime.specs import parse_spec

    spec = parse_spec({"kind": "Agent", "name": "b", "tools": [{"name": "calculator",
                                                                "import_path": "runtime.agents.tools:calculator"}]})
    schema = action_schema(load_tools(spec.tools), True, False, 60)
    lat: list[float] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        async def one():
            t = time.perf_counter()
            r = await c.post(f"{url}/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 256,
                "temperature": 0, "structured_outputs": {"json": schema}})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        return time.perf_counter() - t0, lat


async def agent_sessions(base: str, n: int, prompt: str) -> tuple[float, list[float], list[dict]]:
    import httpx

    lat: list[float] = []
    replies: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        ids = [(await c.post("/sessions")).json()["id"] for _ in range(n)]

        async def one(sid):
            t = time.perf_counter()
            r = await c.post(f"/sessions/{sid}/messages", json={"content": prompt})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            replies.append(r.json())

        t0 = time.perf_counter()
        await asyncio.gather(*[one(s) for s in ids])
        return time.perf_counter() - t0, lat, replies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100, help="concurrent sessions")
    ap.add_argument("--steps-sessions", type=int, default=20, help="sequential sessions for the overhead numbers")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from runtime.agents import start_agent, stop_agent
    from runtime.ray_env import init_ray, shutdown_ray
    from runtime.specs import parse_spec
    from runtime.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    model = write_tiny_model(work / "tiny", seed=0)
    proc, url = start_vllm(model, work / "vllm.log")
    try:
        init_ray(None)
        spec = parse_spec({
            "kind": "Agent", "name": "bench-agent", "auth": "none", "storage": {"root": str(work)},
            "llm": {"url": url, "tool_choice": "required", "max_tool_rounds": 1},
            "tools": [{"name": "calculator", "import_path": "runtime.agents.tools:calculator",
                       "max_concurrency": 64}],
            "session_workers": 2,
            "rate_limit": None,  # one client sends 100 sessions at once: measure the agent, not the limiter
        })
        served = start_agent(spec, port=0)
        prompt = "What is 12 * 7?"
        # 1. overhead: sequential sessions, so no step waits on another
        _, _, seq = asyncio.run(agent_sessions(served.url, 1, prompt))  # warm-up
        overhead, llm_s, tool_s, step_s, by_action, dispatch = [], [], [], [], {}, []
        for _ in range(args.steps_sessions):
            _, _, replies = asyncio.run(agent_sessions(served.url, 1, prompt))
            for st in replies[0]["steps"]:
                overhead.append(st["overhead_ms"])
                llm_s.append(st["llm"]["seconds"] * 1000)
                step_s.append(st["seconds"] * 1000)
                by_action.setdefault(st["action"], []).append(st["overhead_ms"])
                if st.get("tool"):
                    tool_s.append(st["tool"]["seconds"] * 1000)
                    d = (st["tool"]["seconds"] - st["tool"]["run_seconds"]) * 1000
                    dispatch.append(d)
                    by_action.setdefault("tool (Ray task dispatch counted as tool time)", []).append(st["overhead_ms"] - d)
        # 2. concurrency: N sessions at once vs 2N bare engine calls at once (a turn = 2 LLM calls)
        bare_wall, bare_lat = asyncio.run(bare_calls(url, 2 * args.sessions, prompt))
        wall, lat, replies = asyncio.run(agent_sessions(served.url, args.sessions, prompt))
        ok = sum(1 for r in replies if r.get("reply") is not None)
        conc_overhead = [st["overhead_ms"] for r in replies for st in r["steps"]]
        stop_agent(served)
    finally:
        proc.terminate()
        proc.wait(30)
        shutdown_ray()

    n = len(overhead)
    print(f"\n### Agent orchestration (tiny model, vLLM CPU, {os.cpu_count()} cores)\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| steps measured (sequential) | {n} |")
    print(f"| orchestration overhead per step p50 / p95 | {_pct(overhead, .5):.2f} ms / {_pct(overhead, .95):.2f} ms |")
    for action, xs in sorted(by_action.items()):
        print(f"| overhead p50 / p95, {action} steps | {_pct(xs, .5):.2f} ms / {_pct(xs, .95):.2f} ms |")
    print(f"| Ray task dispatch of a tool call (submit to result, minus the tool's run) p50 | {_pct(dispatch, .5):.2f} ms |")
    print(f"| LLM call per step p50 | {_pct(llm_s, .5):.1f} ms |")
    print(f"| tool call (Ray task, incl. dispatch) p50 | {_pct(tool_s, .5):.1f} ms |")
    print(f"| step wall p50 | {_pct(step_s, .5):.1f} ms |")
    print(f"| overhead share of step wall (p50s) | {_pct(overhead, .5) / _pct(step_s, .5):.1%} |")
    print(f"| {args.sessions} concurrent sessions: completed with an answer | {ok}/{args.sessions} |")
    print(f"| {args.sessions} concurrent sessions: wall | {wall:.1f} s |")
    print(f"| per-session turn latency p50 / p95 | {_pct(lat, .5):.2f} s / {_pct(lat, .95):.2f} s |")
    print(f"| overhead per step under concurrency p50 / p95 | {_pct(conc_overhead, .5):.1f} ms / {_pct(conc_overhead, .95):.1f} ms |")
    print(f"| bare engine: {2 * args.sessions} concurrent guided calls, wall | {bare_wall:.1f} s |")
    print(f"| agent wall / bare engine wall (same LLM calls; a turn's 2 calls are sequential) | {wall / bare_wall:.2f}x |")
    print(f"| bare call latency p50 | {statistics.median(bare_lat):.2f} s |")


if __name__ == "__main__":
    main()
