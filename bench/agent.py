"""Agent orchestration overhead, the planner against a measured load, and 1,000 sessions.

    python -m bench.agent [--steps-sessions 20] [--sessions 100] [--rate 3 --rate-s 20] [--many 1000]

Starts a vLLM OpenAI server on the tiny model (guided JSON, compact) and agent apps on a local
Ray cluster pointed at it (every turn = a tool step + an answer step), then:

1. per-step orchestration overhead: step wall time minus the LLM call and the tool's own run
   time (prompt assembly, schema, parsing, tool dispatch, the store write, tracing), from
   sequential sessions, for a Python tool in a tool process (the default), the same tool as a
   Ray task per call (the old dispatch), in a thread, an MCP tool (tests/agent/mcp_server.py
   over stdio), and a tool that needs approval (the turn pauses; POST /sessions/ID/approvals
   resumes it: its round trip is reported too); goal p50 <= 2 ms;
2. the capacity planner against a measured run: the profile (first prompt, output tokens, what
   a tool result adds to the history, steps per session) comes from the sequential sessions of
   1.; sessions then arrive at a fixed rate and the engine's own token counters (vLLM
   ``/metrics``) give the LLM tokens/s actually processed; goal: prediction within 25 %;
3. N concurrent sessions over HTTP vs the same number of bare chat calls at the same concurrency;
4. ``--many`` sessions created at once, then one message each, all at once: errors, latency,
   the session store's writes and size, and the memory of the session actors, their tool
   processes and the ingress;
5. ``--many-paused`` sessions whose turns all pause on an approval at once, then all approved.

Prints markdown tables. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.serving.deploy import free_port

ROOT = Path(__file__).resolve().parents[1]


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


def engine_tokens(url: str) -> tuple[float, float]:
    """(prompt, generated) tokens the engine has processed so far, from its Prometheus counters."""
    import httpx

    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^vllm:{name}_total\{{[^}}]*\}} (\S+)$", text, re.M))

    return total("prompt_tokens"), total("generation_tokens")


def question(rng: random.Random) -> str:
    return f"What is {rng.randint(2, 999)} * {rng.randint(2, 99)}?"


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


async def agent_sessions(base: str, prompts: list[str], max_connections: int = 256) -> tuple[float, list[float], list[dict]]:
    """One session per prompt, all sent at once; (wall, turn latencies, replies)."""
    import httpx

    lat: list[float] = []
    replies: list[dict] = []
    async with httpx.AsyncClient(base_url=base, timeout=900,
                                 limits=httpx.Limits(max_connections=max_connections)) as c:
        ids = [(await c.post("/sessions")).json()["id"] for _ in prompts]

        async def one(sid, prompt):
            t = time.perf_counter()
            r = await c.post(f"/sessions/{sid}/messages", json={"content": prompt})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            replies.append(r.json())

        t0 = time.perf_counter()
        await asyncio.gather(*[one(s, p) for s, p in zip(ids, prompts)])
        return time.perf_counter() - t0, lat, replies


def overhead_run(base: str, n: int, rng: random.Random) -> dict:
    asyncio.run(agent_sessions(base, [question(rng)]))  # warm-up
    out: dict = {"overhead": [], "tool_step": [], "answer_step": [], "llm_ms": [], "tool_ms": [], "dispatch_ms": [],
                 "steps": []}
    for _ in range(n):
        _, _, replies = asyncio.run(agent_sessions(base, [question(rng)]))
        _account(out, replies[0]["steps"])
    return out


def _account(out: dict, steps: list[dict]) -> None:
    """Add one session's step records to the overhead figures."""
    out["steps"].append(steps)
    for st in steps:
        out["overhead"].append(st["overhead_ms"])
        if st.get("llm"):
            out["llm_ms"].append(st["llm"]["seconds"] * 1000)
        if st.get("tool") and "run_seconds" in st["tool"]:
            out["tool_step"].append(st["overhead_ms"])
            out["tool_ms"].append(st["tool"]["seconds"] * 1000)
            out["dispatch_ms"].append((st["tool"]["seconds"] - st["tool"]["run_seconds"]) * 1000)
        elif st["action"] == "answer":
            out["answer_step"].append(st["overhead_ms"])


async def approval_sessions(base: str, n: int, rng: random.Random) -> dict:
    """Sequential sessions whose tool needs approval: the message pauses the turn, the approval
    (approve, arguments unchanged) resumes it. Step figures as ``overhead_run``, plus the approval
    round trip: the client's wall time of POST /sessions/ID/approvals minus the LLM and tool time
    spent inside it (HTTP, guard, ingress, session actor, store load and saves, the decision)."""
    import httpx

    out: dict = {"overhead": [], "tool_step": [], "answer_step": [], "llm_ms": [], "tool_ms": [], "dispatch_ms": [],
                 "steps": [], "round_trip_ms": [], "paused": 0}
    async with httpx.AsyncClient(base_url=base, timeout=900) as c:
        for i in range(n + 1):  # the first is a warm-up
            sid = (await c.post("/sessions", json={"allow_tools": ["calculator"]})).json()["id"]
            first = (await c.post(f"/sessions/{sid}/messages", json={"content": question(rng)})).json()
            pending = first.get("pending_approval")
            if not pending:
                continue
            t = time.perf_counter()
            r = await c.post(f"/sessions/{sid}/approvals", json={"call_id": pending["call_id"], "decision": "approve"})
            wall = time.perf_counter() - t
            r.raise_for_status()
            reply = r.json()
            if i == 0:
                continue
            out["paused"] += 1
            inside = sum(st.get("llm", {}).get("seconds", 0.0) for st in reply["steps"][1:])
            inside += sum((st.get("tool") or {}).get("run_seconds", 0.0) for st in reply["steps"])
            out["round_trip_ms"].append((wall - inside) * 1000)
            _account(out, reply["steps"])
    return out


def profile_from(steps: list[list[dict]], rate: float) -> dict:
    """The planner's profile, from sequential sessions: what an operator would measure on a few."""
    first = [s[0]["llm"]["tokens_in"] for s in steps]
    outs = [st["llm"]["tokens_out"] for s in steps for st in s]
    # What a tool result adds to the next prompt: its fenced observation through the chat template.
    adds = [s[1]["llm"]["tokens_in"] - s[0]["llm"]["tokens_in"] - s[0]["llm"]["tokens_out"]
            for s in steps if len(s) > 1 and s[0].get("tool")]
    n_steps = statistics.mean(len(s) for s in steps)
    n_tools = statistics.mean(sum(1 for st in s if st.get("tool")) for s in steps)
    return {"sessions_per_s": rate, "steps_per_session": n_steps, "tool_calls_per_session": n_tools,
            "prompt_tokens": statistics.mean(first), "output_tokens": statistics.mean(outs),
            "tool_result_tokens": statistics.mean(adds) if adds else 0}


async def arrivals(base: str, rate: float, seconds: float, rng: random.Random, vllm_url: str) -> dict:
    """Sessions arriving every 1/rate s for ``seconds``; engine tokens/s over the steady window
    (from the first arrival + one session's length to the last arrival)."""
    import httpx

    replies: list[dict] = []
    marks: dict[str, tuple[float, tuple[float, float]]] = {}
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=512)) as c:
        async def one(prompt):
            sid = (await c.post("/sessions")).json()["id"]
            r = await c.post(f"/sessions/{sid}/messages", json={"content": prompt})
            r.raise_for_status()
            replies.append(r.json())

        async def mark(name, at):
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            marks[name] = (time.perf_counter(), await asyncio.to_thread(engine_tokens, vllm_url))

        t0 = time.perf_counter()
        n = int(rate * seconds)
        warm = min(5.0, seconds / 4)
        markers = [asyncio.create_task(mark("start", t0 + warm)), asyncio.create_task(mark("end", t0 + seconds))]
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(question(rng))))
        await asyncio.gather(*markers)
        await asyncio.gather(*tasks)
    (ta, (pa, ga)), (tb, (pb, gb)) = marks["start"], marks["end"]
    span = tb - ta
    return {"sessions": n, "ok": sum(1 for r in replies if r.get("reply") is not None), "window_s": span,
            "prompt_tokens_per_s": (pb - pa) / span, "output_tokens_per_s": (gb - ga) / span,
            "tokens_per_s": (pb - pa + gb - ga) / span,
            "trace_tokens_per_session": statistics.mean(r["usage"]["tokens"] for r in replies)}


def actor_memory(names: list[str]) -> tuple[float, float, int]:
    """(session actors' RSS MB, their tool processes' PSS MB, tool processes). PSS shares the
    pages the tool processes have in common (the interpreter) among them."""
    import psutil
    import ray

    from runtime.agents.worker import NAMESPACE

    own = kids = 0.0
    n = 0
    for name in names:
        p = psutil.Process(ray.get(ray.get_actor(name, namespace=NAMESPACE).pid.remote()))
        own += p.memory_info().rss
        for q in p.children(recursive=True):
            try:
                kids += q.memory_full_info().pss
                n += 1
            except psutil.NoSuchProcess:
                continue
    return own / 2**20, kids / 2**20, n


def ingress_memory(app: str) -> float:
    import psutil

    total = 0.0
    for p in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{app}" in a for a in (p.info["cmdline"] or [])):
            total += p.memory_info().rss
    return total / 2**20


async def many_sessions(base: str, n: int, rng: random.Random) -> dict:
    """n sessions created at once, then one message to each, all at once, then a read of each."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=1800, limits=httpx.Limits(max_connections=n)) as c:
        async def timed(coro):
            t = time.perf_counter()
            r = await coro
            return r, time.perf_counter() - t

        t0 = time.perf_counter()
        created = await asyncio.gather(*[timed(c.post("/sessions")) for _ in range(n)])
        create_wall = time.perf_counter() - t0
        ids = [r.json()["id"] for r, _ in created if r.status_code == 200]
        t0 = time.perf_counter()
        sent = await asyncio.gather(*[timed(c.post(f"/sessions/{s}/messages", json={"content": question(rng)}))
                                      for s in ids])
        send_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = await asyncio.gather(*[timed(c.get(f"/sessions/{s}")) for s in ids])
        get_wall = time.perf_counter() - t0
    ok = [r.json() for r, _ in sent if r.status_code == 200]
    unanswered: dict[str, int] = {}
    for r in ok:
        if r.get("reply") is None and r["steps"]:
            why = f"{r['steps'][-1]['action']}: {(r['steps'][-1].get('error') or '')[:80]}"
            unanswered[why] = unanswered.get(why, 0) + 1
    return {"unanswered": unanswered,
        "created": len(ids), "create_errors": n - len(ids), "create_wall": create_wall,
        "create_p50": _pct([t for _, t in created], .5), "create_p95": _pct([t for _, t in created], .95),
        "answered": sum(1 for r in ok if r.get("reply") is not None), "send_errors": len(ids) - len(ok),
        "send_wall": send_wall, "send_p50": _pct([t for _, t in sent], .5), "send_p95": _pct([t for _, t in sent], .95),
        "steps": sum(len(r["steps"]) for r in ok),
        "get_errors": sum(1 for r, _ in got if r.status_code != 200), "get_wall": get_wall,
        "get_p50": _pct([t for _, t in got], .5), "get_p95": _pct([t for _, t in got], .95),
        "doc_bytes": statistics.mean(len(r.content) for r, _ in got if r.status_code == 200),
    }


async def many_paused(base: str, n: int, rng: random.Random) -> dict:
    """n sessions whose tool needs approval, created at once; one message each, all at once (every
    turn pauses on its tool call); then every call approved at once (every turn resumes)."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=1800, limits=httpx.Limits(max_connections=n)) as c:
        made = await asyncio.gather(*[c.post("/sessions", json={"allow_tools": ["calculator"]}) for _ in range(n)])
        ids = [r.json()["id"] for r in made if r.status_code == 200]
        t0 = time.perf_counter()
        sent = await asyncio.gather(*[c.post(f"/sessions/{s}/messages", json={"content": question(rng)}) for s in ids])
        pause_wall = time.perf_counter() - t0
        pending = {s: r.json().get("pending_approval") for s, r in zip(ids, sent) if r.status_code == 200}
        paused = {s: p for s, p in pending.items() if p}
        t0 = time.perf_counter()
        decided = await asyncio.gather(*[c.post(f"/sessions/{s}/approvals", json={"call_id": p["call_id"],
                                                                                 "decision": "approve"})
                                         for s, p in paused.items()])
        resume_wall = time.perf_counter() - t0
    replies = [r.json() for r in decided if r.status_code == 200]
    return {"created": len(ids), "http_errors": (n - len(ids)) + sum(r.status_code != 200 for r in sent)
            + sum(r.status_code != 200 for r in decided), "paused": len(paused), "pause_wall": pause_wall,
            "answered": sum(1 for r in replies if r.get("reply") is not None), "resume_wall": resume_wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps-sessions", type=int, default=20, help="sequential sessions per overhead variant")
    ap.add_argument("--sessions", type=int, default=100, help="concurrent sessions vs bare calls (0: skip)")
    ap.add_argument("--rate", type=float, default=3.0, help="sessions/s for the planner check (0: skip)")
    ap.add_argument("--rate-s", type=float, default=20.0, help="seconds of arrivals for the planner check")
    ap.add_argument("--many", type=int, default=1000, help="sessions at once, with store and memory figures (0: skip)")
    ap.add_argument("--many-paused", type=int, default=1000,
                    help="sessions paused on an approval at once, then all approved (0: skip)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from runtime.agents import start_agent
    from runtime.planning_agents import plan_agent
    from runtime.ray_env import init_ray, shutdown_ray
    from runtime.specs import parse_spec
    from runtime.tiny_model import write_tiny_model

    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    model = write_tiny_model(work / "tiny", seed=0)
    proc, url = start_vllm(model, work / "vllm.log")
    port = free_port()
    calc = {"name": "calculator", "import_path": "runtime.agents.tools:calculator", "max_concurrency": 64}
    mcp = {"name": "m", "transport": "stdio", "command": sys.executable, "args": [str(ROOT / "tests/agent/mcp_server.py")],
           "allow_tools": ["upper"], "max_concurrency": 64}
    variants = {  # name -> (what, spec patch)
        "process": ("Python tool, tool process (default)", {"tools": [calc]}),
        "task": ("Python tool, Ray task per call (before)", {"tools": [{**calc, "isolation": "ray_task"}]}),
        "thread": ("Python tool, thread", {"tools": [{**calc, "isolation": "thread"}]}),
        "mcp": ("MCP tool (stdio server)", {"mcp_servers": [mcp]}),
        "approval": ("Python tool, requires_approval (paused, then approved)",
                     {"tools": [{**calc, "requires_approval": True}]}),
    }
    results: dict = {}
    try:
        init_ray(None)
        served = {}
        for name, (_, patch) in variants.items():
            spec = parse_spec({
                "kind": "Agent", "name": f"bench-{name}", "auth": "none", "storage": {"root": str(work)},
                "route_prefix": f"/{name}",
                "llm": {"url": url, "tool_choice": "required", "max_tool_rounds": 1}, "session_workers": 2,
                "rate_limit": None,  # one client sends many sessions at once: measure the agent, not the limiter
                **patch,
            })
            served[name] = (spec, start_agent(spec, port=port))
        # 1. overhead: sequential sessions, so no step waits on another
        for name in variants:
            if name == "approval":
                results[name] = asyncio.run(approval_sessions(served[name][1].url, args.steps_sessions, rng))
            else:
                results[name] = overhead_run(served[name][1].url, args.steps_sessions, rng)
        base = served["process"][1].url
        # 2. the planner against a run at a known session rate
        if args.rate:
            profile = profile_from(results["process"]["steps"], args.rate)
            predicted = plan_agent(profile)
            measured = asyncio.run(arrivals(base, args.rate, args.rate_s, rng, url))
            results["plan"] = (profile, predicted, measured)
        # 3. concurrency: N sessions at once vs 2N bare engine calls at once (a turn = 2 LLM calls)
        if args.sessions:
            prompts = [question(rng) for _ in range(args.sessions)]
            bare = asyncio.run(bare_calls(url, 2 * args.sessions, prompts[0]))
            wall, lat, replies = asyncio.run(agent_sessions(base, prompts))
            results["conc"] = (bare, wall, lat, replies)
        # 4. many sessions at once
        if args.many:
            spec, result = served["process"]
            db = Path(result.session_store.split(":", 1)[1])

            def db_size() -> int:
                return sum(f.stat().st_size for f in db.parent.glob(db.name + "*"))

            mem0, size0 = actor_memory(result.actors), db_size()
            many = asyncio.run(many_sessions(base, args.many, rng))
            mem1, size1 = actor_memory(result.actors), db_size()
            results["many"] = (many, mem0, mem1, ingress_memory(spec.name), size0, size1)
        if args.many_paused:
            results["paused"] = asyncio.run(many_paused(served["approval"][1].url, args.many_paused, rng))
    finally:
        proc.terminate()
        proc.wait(30)
        shutdown_ray()
    report(args, variants, results)


def report(args, variants: dict, results: dict) -> None:
    print(f"\n### Agent orchestration (tiny model, vLLM CPU, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})\n")
    print("| tool | steps | overhead p50 / p95 (all steps) | tool steps p50 | answer steps p50 | "
          "dispatch p50 (call minus the tool's run) | tool call p50 | LLM call p50 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (what, _) in variants.items():
        r = results[name]
        print(f"| {what} | {len(r['overhead'])} | {_pct(r['overhead'], .5):.2f} / {_pct(r['overhead'], .95):.2f} ms | "
              f"{_pct(r['tool_step'], .5):.2f} ms | {_pct(r['answer_step'], .5):.2f} ms | "
              f"{_pct(r['dispatch_ms'], .5):.2f} ms | {_pct(r['tool_ms'], .5):.2f} ms | {_pct(r['llm_ms'], .5):.1f} ms |")
    a = results.get("approval")
    if a and a["round_trip_ms"]:
        print(f"\napproval round trip (POST /sessions/ID/approvals minus the LLM and tool time in it; "
              f"{a['paused']} paused sessions): p50 {_pct(a['round_trip_ms'], .5):.1f} ms, "
              f"p95 {_pct(a['round_trip_ms'], .95):.1f} ms; the approved step's overhead (table) includes the "
              "decision's store load and saves")
    if "plan" in results:
        profile, p, m = results["plan"]
        print(f"\n### Planner vs a measured run ({m['sessions']} sessions at {args.rate:g}/s, "
              f"{m['ok']} answered; engine counters over {m['window_s']:.1f} s)\n")
        print("profile (from the sequential sessions): " + ", ".join(f"{k}={v:.4g}" for k, v in profile.items()))
        print("\n| LLM load | planned | measured (vLLM /metrics) | measured / planned |")
        print("|---|---|---|---|")
        for label, a, b in [("prompt tokens/s", p.prompt_tokens_per_s, m["prompt_tokens_per_s"]),
                             ("output tokens/s", p.output_tokens_per_s, m["output_tokens_per_s"]),
                             ("total tokens/s", p.llm_tokens_per_s, m["tokens_per_s"])]:
            print(f"| {label} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
        per = p.prompt_tokens_per_session + p.steps_per_s / p.profile["sessions_per_s"] * p.profile["output_tokens"]
        print(f"| tokens per session (planned / agent traces) | {per:,.0f} | {m['trace_tokens_per_session']:,.0f} | "
              f"{m['trace_tokens_per_session'] / per:.2f} |")
        ok = abs(m["tokens_per_s"] / p.llm_tokens_per_s - 1) <= 0.25
        print(f"\nwithin 25 %: {'yes' if ok else 'NO'}")
    if "conc" in results:
        (bare_wall, bare_lat), wall, lat, replies = results["conc"]
        n = len(replies)
        ok = sum(1 for r in replies if r.get("reply") is not None)
        conc = [st["overhead_ms"] for r in replies for st in r["steps"]]
        print(f"\n### {n} concurrent sessions vs {2 * n} bare guided calls\n")
        print("| measure | value |")
        print("|---|---|")
        print(f"| completed with an answer | {ok}/{n} |")
        print(f"| agent wall / bare wall | {wall:.1f} s / {bare_wall:.1f} s = {wall / bare_wall:.2f}x |")
        print(f"| turn latency p50 / p95 | {_pct(lat, .5):.2f} s / {_pct(lat, .95):.2f} s |")
        print(f"| overhead per step under load p50 / p95 | {_pct(conc, .5):.1f} ms / {_pct(conc, .95):.1f} ms |")
        print(f"| bare call latency p50 | {statistics.median(bare_lat):.2f} s |")
    if "many" in results:
        m, (a0, t0, n0), (a1, t1, n1), ingress, size0, size1 = results["many"]
        print(f"\n### {args.many} sessions at once (create, one message each, read)\n")
        print("| measure | value |")
        print("|---|---|")
        print(f"| created / errors | {m['created']} / {m['create_errors']} (wall {m['create_wall']:.1f} s, "
              f"p50 {m['create_p50'] * 1000:.0f} ms, p95 {m['create_p95'] * 1000:.0f} ms) |")
        print(f"| answered / errors | {m['answered']} / {m['send_errors']} (wall {m['send_wall']:.1f} s, "
              f"turn p50 {m['send_p50']:.1f} s, p95 {m['send_p95']:.1f} s) |")
        for why, k in m["unanswered"].items():
            print(f"| turns that ended without an answer | {k}: {why} |")
        writes = m["steps"] + 2 * m["answered"] + m["created"]
        print(f"| store writes | {writes} ({writes / m['send_wall']:.0f}/s during the messages); SQLite "
              f"{size0 / 2**20:.1f} -> {size1 / 2**20:.1f} MiB, {m['doc_bytes'] / 1000:.1f} kB a session (GET body) |")
        print(f"| read back / errors | {m['created'] - m['get_errors']} / {m['get_errors']} (wall {m['get_wall']:.1f} s, "
              f"p50 {m['get_p50'] * 1000:.0f} ms) |")
        print(f"| session actors' RSS before / after | {a0:.0f} / {a1:.0f} MB (2 actors) |")
        print(f"| their tool processes (PSS) | {n0} / {n1} processes, {t0:.0f} / {t1:.0f} MB |")
        print(f"| ingress replica(s) RSS after | {ingress:.0f} MB |")
    if "paused" in results:
        p = results["paused"]
        print(f"\n### {args.many_paused} sessions paused on an approval at once, then all approved\n")
        print("| measure | value |")
        print("|---|---|")
        print(f"| created / HTTP errors (all requests) | {p['created']} / {p['http_errors']} |")
        print(f"| paused on the tool call | {p['paused']} (messages wall {p['pause_wall']:.1f} s) |")
        print(f"| answered after the approval | {p['answered']} (approvals wall {p['resume_wall']:.1f} s) |")


if __name__ == "__main__":
    main()
