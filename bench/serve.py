"""Online-inference benchmark: raylane's Serve app vs bare vLLM's OpenAI server, same model,
same machine, same run; streaming completions at fixed concurrency.

    python -m bench.serve                                  # both servers, 1 and 16 streams
    python -m bench.serve --concurrency 16 --requests 400
    python -m bench.serve --url http://host:8000 --model tiny-chat --key KEY   # load-test any endpoint

Reports TTFT, TPOT and end-to-end latency percentiles (p50/p95/p99) and throughput, then a
markdown table with raylane/bare ratios. The two servers run one after the other, never at once.

Both servers are pinned alike (``--no-pin`` turns it off): vLLM's CPU worker computes on the
engine CPUs (all allowed CPUs but the last, ``VLLM_CPU_OMP_THREADS_BIND``); once the server is
up, vLLM's engine processes (EngineCore and the worker) are moved to those CPUs and every other
process of this benchmark (the load generator, vLLM's API server, or Ray, Serve, HAProxy and
the replica) to the last CPU. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.serving.deploy import free_port

PROMPT = "Ray Serve and vLLM serve this benchmark prompt"
# vLLM's engine processes (setproctitle names): the CPU worker, whose OpenMP threads run the
# model, and EngineCore, the scheduler that busy-waits on the worker's results each step.
ENGINE_PROCESS_TITLES = ("VLLM::EngineCore", "VLLM::Worker")


def cpu_split() -> tuple[list[int], list[int]] | None:
    """(engine CPUs, CPUs for everything else): like vLLM's own ``auto`` binding on one NUMA node
    without SMT, the last allowed CPU is kept for the processes that do not compute. None on 1 CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[:-1], cpus[-1:]) if len(cpus) > 1 else None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="latin-1") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("latin-1")
    except OSError:
        return ""


def pin_tree(split: tuple[list[int], list[int]], root: int | None = None) -> dict[str, int]:
    """Pin every thread of ``root`` (default: this process) and its descendants: vLLM's engine
    processes to the engine CPUs, the rest to the other CPUs. Returns how many processes went where."""
    engine, other = split
    tree, todo, counts = _children(), [root or os.getpid()], {"engine": 0, "other": 0}
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        where = "engine" if _cmdline(pid).startswith(ENGINE_PROCESS_TITLES) else "other"
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # exited meanwhile
        for tid in tids:
            try:
                os.sched_setaffinity(tid, engine if where == "engine" else other)
            except OSError:  # a thread that exited meanwhile
                pass
        counts[where] += 1
    return counts


def _unpin(cpus: set[int]) -> None:
    """Give this process's threads ``cpus`` again, so the next server starts as the first did."""
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def _pin(split, server: str) -> None:
    if split is None:
        return
    counts = pin_tree(split)
    print(f"[bench] {server}: {counts['engine']} engine process(es) on CPUs {split[0]}, {counts['other']} other "
          f"process(es) on CPUs {split[1]}", file=sys.stderr, flush=True)
    if counts["engine"] != len(ENGINE_PROCESS_TITLES):
        raise RuntimeError(f"expected one each of {ENGINE_PROCESS_TITLES} under this benchmark, found "
                           f"{counts['engine']} engine processes; run with --no-pin")


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def pct(self, name: str, q: float) -> float:
        xs = sorted(getattr(self, name))
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    def summary(self) -> dict:
        out = {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
               "req_per_s": round(self.rps, 2), "tok_per_s": round(self.tokens / self.seconds, 1)}
        for m in ("ttft_ms", "tpot_ms", "e2e_ms"):
            for q in (50, 95, 99):
                out[f"{m[:-3]}_p{q}_ms"] = round(self.pct(m, q), 1)
        return out


async def _one(client, url: str, model: str, max_tokens: int, headers: dict, res: LoadResult):
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                res.errors += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                # The first chunk carrying a choice is the first token, even when its text is
                # empty (a random tiny model emits partial UTF-8 bytes that decode to "").
                if chunk.get("choices") and first is None:
                    first = time.perf_counter()
    except Exception:  # noqa: BLE001 - count, don't crash the load generator
        res.errors += 1
        return
    t1 = time.perf_counter()
    if first is None:
        res.errors += 1
        return
    res.ttft_ms.append((first - t0) * 1000)
    res.e2e_ms.append((t1 - t0) * 1000)
    res.tpot_ms.append((t1 - first) * 1000 / max(1, max_tokens - 1))
    res.tokens += max_tokens


async def load(url: str, model: str, *, concurrency: int, requests: int, max_tokens: int = 32,
               key: str | None = None, warmup: int = 4) -> LoadResult:
    """Send ``requests`` streaming completions with ``concurrency`` in flight; measure each."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        scratch = LoadResult(concurrency, warmup, 0, 0)
        await asyncio.gather(*[_one(client, url, model, max_tokens, headers, scratch) for _ in range(warmup)])
        res = LoadResult(concurrency, requests, 0, 0)
        queue: asyncio.Queue = asyncio.Queue()
        for _ in range(requests):
            queue.put_nowait(None)

        async def worker():
            while not queue.empty():
                queue.get_nowait()
                await _one(client, url, model, max_tokens, headers, res)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        res.seconds = time.perf_counter() - t0
    return res


def _wait_http(url: str, timeout_s: float, proc=None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def bench_bare(model_dir: str, max_model_len: int, max_num_seqs: int, runs: list[tuple[int, int]], max_tokens: int,
               split=None):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--enforce-eager",
           "--disable-uvicorn-access-log"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    print(f"[bench] starting bare vLLM on :{port}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", 600, proc)
        _pin(split, "bare vLLM")
        url = f"http://127.0.0.1:{port}"
        return [asyncio.run(load(url, "tiny", concurrency=c, requests=n, max_tokens=max_tokens)) for c, n in runs]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_raylane(model_dir: str, max_model_len: int, max_num_seqs: int, runs: list[tuple[int, int]],
                  max_tokens: int, split=None):
    from ray import serve

    from runtime.ray_env import shutdown_ray
    from runtime.serving import start_serving
    from runtime.specs import parse_spec

    os.environ["RAYLANE_API_KEYS"] = "bench-key"
    spec = parse_spec({
        "kind": "OnlineInference", "name": "bench", "model": model_dir, "model_id": "tiny",
        "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
        "rate_limit": None,
        "slo": {"ttft_ms_p95": 100},
    })
    result = start_serving(spec, port=0)
    try:
        _pin(split, "raylane")
        return [asyncio.run(load(result.url, "tiny", concurrency=c, requests=n, max_tokens=max_tokens,
                                 key="bench-key")) for c, n in runs]
    finally:
        serve.shutdown()
        shutdown_ray()


def table(bare: list[LoadResult], ours: list[LoadResult]) -> str:
    rows = ["| streams | server | TTFT p50 / p95 / p99 (ms) | TPOT p50 (ms) | e2e p50 (ms) | req/s | errors |",
            "|---|---|---|---|---|---|---|"]
    for b, o in zip(bare, ours):
        for name, r in (("bare vLLM", b), ("raylane", o)):
            rows.append(f"| {r.concurrency} | {name} | {r.pct('ttft_ms', 50):.1f} / {r.pct('ttft_ms', 95):.1f} / "
                        f"{r.pct('ttft_ms', 99):.1f} | {r.pct('tpot_ms', 50):.2f} | {r.pct('e2e_ms', 50):.1f} | "
                        f"{r.rps:.1f} | {r.errors} |")
        rows.append(f"| {b.concurrency} | **raylane vs bare** | TTFT p50 {o.pct('ttft_ms', 50) - b.pct('ttft_ms', 50):+.1f} ms"
                    f" | x{o.pct('tpot_ms', 50) / b.pct('tpot_ms', 50):.2f} | x{o.pct('e2e_ms', 50) / b.pct('e2e_ms', 50):.2f}"
                    f" | **x{o.rps / b.rps:.2f}** | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="load-test this endpoint only (no comparison)")
    p.add_argument("--model", default="tiny", help="model id to request (with --url)")
    p.add_argument("--key", help="API key (with --url)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=0, help="requests per run (default 24 x concurrency, >= 48)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    p.add_argument("--no-pin", action="store_true", help="leave CPU placement to the kernel and vLLM's auto binding")
    a = p.parse_args(argv)
    runs = [(c, a.requests or max(48, 24 * c)) for c in a.concurrency]
    if a.url:
        for c, n in runs:
            print(json.dumps(asyncio.run(load(a.url, a.model, concurrency=c, requests=n, max_tokens=a.max_tokens,
                                              key=a.key)).summary()))
        return 0
    from runtime.tiny_model import write_tiny_model

    model_dir = str(write_tiny_model(Path(os.environ.get("RAYLANE_BENCH_DIR", "/tmp/raylane-bench")) / "tiny", seed=0))
    split = None if a.no_pin else cpu_split()
    if split is not None:
        # Both servers' vLLM workers inherit it (Ray workers inherit this process's environment).
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, split[0]))
    load_avg, allowed = [os.getloadavg()], os.sched_getaffinity(0)
    bare = bench_bare(model_dir, a.max_model_len, a.max_num_seqs, runs, a.max_tokens, split)
    load_avg.append(os.getloadavg())
    _unpin(allowed)
    ours = bench_raylane(model_dir, a.max_model_len, a.max_num_seqs, runs, a.max_tokens, split)
    load_avg.append(os.getloadavg())
    if a.json:
        print(json.dumps({"bare": [r.summary() for r in bare], "raylane": [r.summary() for r in ours],
                          "load_avg_1m": [round(x[0], 2) for x in load_avg]}, indent=1))
    pinning = (f"engine on CPUs {split[0]}, the rest on {split[1]}" if split else "unpinned")
    print(f"\n{a.max_tokens}-token streaming completions, tiny Llama, {os.cpu_count()} cores ({pinning}); "
          f"load average (1 min) at start / after bare / after raylane: "
          f"{' / '.join(f'{x[0]:.2f}' for x in load_avg)}\n")
    print(table(bare, ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
