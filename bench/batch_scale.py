"""Batch at scale: raylane's own overhead (driver memory, driver CPU, time to first commit) as the
corpus grows, with ``max_tokens: 1`` so the engine's work is as small as it gets.

    python -m bench.batch_scale                      # 10k and 100k short rows
    python -m bench.batch_scale --rows 10000 100000 1000000

Each corpus runs in a fresh driver process (``--one N`` is that child), so one corpus' memory
never counts against the next. Measured in the driver process only (not Ray's raylet, workers,
or the engine): peak RSS sampled every 0.1 s, CPU seconds (user + system, every driver thread)
from ``getrusage``. Time to first commit is the first commit record's ``committed_at`` minus the
start of ``run_batch``. The corpus is jsonl in files of 10k rows (a folder input), prompts a few
words long; rows_per_shard 1000, batch_size 256.

    python -m bench.batch_scale --rows 100000 --plain   # also a plain ``ray.data.llm`` pipeline

``--plain`` runs, in its own fresh driver after raylane's, what a user writes without raylane on
the same corpus: ``ray.data.read_json`` → a ``ray.data.llm`` processor (tokenize, engine,
detokenize; same engine settings and batch size) → ``write_parquet``. Its "first commit" is the
first parquet file written (Ray Data writes as blocks finish, which for a short pipeline is near
the end). The per-row cost compared is wall / rows, start-up included, at the same row count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FILE_ROWS = 10_000


def write_corpus(folder: Path, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = ("ray", "data", "shards", "engines", "tokens", "plans", "leases", "commits")
    for start in range(0, rows, FILE_ROWS):
        lines = [json.dumps({"id": f"r{i:08d}", "prompt": f"Say {words[i % 8]} {i}"}) + "\n"
                 for i in range(start, min(start + FILE_ROWS, rows))]
        (folder / f"part-{start // FILE_ROWS:05d}.jsonl").write_text("".join(lines))
    return folder


class _Peak:
    def __init__(self, every_s: float = 0.1):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every_s, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(self.every)

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.proc.memory_info().rss)


def one_plain(rows: int) -> dict:
    """The same corpus through a plain ``ray.data.llm`` pipeline (no raylane in the data path)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from runtime.ray_env import ray_session
    from runtime.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-scale-plain-"))
    model = write_tiny_model(work / "tiny-llama", seed=0)
    corpus = write_corpus(work / "corpus", rows)
    out = work / "out"
    peak = _Peak()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    with ray_session(None):  # the same local cluster raylane starts
        config = vLLMEngineProcessorConfig(
            model_source=str(model),
            engine_kwargs=dict(max_model_len=128, enforce_eager=True, disable_log_stats=True),
            batch_size=256, concurrency=1, placement_group_config={"bundles": [{"CPU": 1}]},
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}},
            chat_template_stage=False, tokenize_stage=True, detokenize_stage=True, log_engine_metrics=False)
        processor = build_processor(
            config,
            preprocess=lambda row: dict(id=row["id"], prompt=row["prompt"],
                                        sampling_params=dict(max_tokens=1, temperature=0.0)),
            postprocess=lambda row: dict(id=row["id"], text=row["generated_text"]))
        processor(ray.data.read_json(str(corpus))).write_parquet(str(out))
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    rss = peak.done()
    files = list(out.glob("*.parquet"))
    first = min(f.stat().st_mtime for f in files) - t0
    import pyarrow.parquet as pq

    written = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return dict(rows=rows, code="plain ray.data.llm", ok=written == rows, wall_s=round(wall, 1),
                first_commit_s=round(first, 1), driver_peak_rss_mb=round(rss / 2**20),
                driver_cpu_s=round((cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 1),
                load=round(os.getloadavg()[0], 1))


def one(rows: int) -> dict:
    from runtime.batch import run_batch
    from runtime.batch import shards as sh
    from runtime.specs import parse_spec
    from runtime.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    model = write_tiny_model(work / "tiny-llama", seed=0)
    corpus = write_corpus(work / "corpus", rows)
    spec = parse_spec({
        "kind": "BatchInference", "name": "scale", "model": str(model),
        "input": {"path": str(corpus), "format": "jsonl"},
        "output": {"path": str(work / "out"), "format": "parquet"},
        "sampling": {"max_tokens": 1}, "rows_per_shard": 1000, "batch_size": 256,
        "max_model_len": 128, "storage": {"root": str(work)},
    })
    peak = _Peak()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    result = run_batch(spec)
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    rss = peak.done()
    commits = sh.read_commits(spec.output_path())
    first = min(c.committed_at for c in commits.values()) - t0
    return dict(rows=rows, code="raylane", ok=result.ok, wall_s=round(wall, 1), first_commit_s=round(first, 1),
                driver_peak_rss_mb=round(rss / 2**20), driver_cpu_s=round(
                    (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime), 1),
                load=round(os.getloadavg()[0], 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch_scale", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--plain", action="store_true", help="also run a plain ray.data.llm pipeline")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-plain", type=int, help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help="a label for the table (e.g. the git commit)")
    args = p.parse_args(argv)
    if args.one or args.one_plain:
        r = one(args.one) if args.one else one_plain(args.one_plain)
        print("RESULT " + json.dumps(r), flush=True)
        return 0 if r["ok"] else 1
    results = []
    runs = [("--one", n) for n in args.rows] + ([("--one-plain", n) for n in args.rows] if args.plain else [])
    for flag, n in runs:
        print(f"[bench] {n} rows {flag} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.batch_scale", flag, str(n)],
                              stdout=subprocess.PIPE, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"[bench] {n} rows {flag} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        results.append(json.loads(line[len("RESULT "):]))
    print(f"\nbatch at scale {args.label} (max_tokens 1, tiny Llama, {os.cpu_count()} cores; driver process only)\n")
    print("| code | rows | wall s | first commit s | ms per row | driver peak RSS MB | driver CPU s "
          "| ok | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        per_row = r["wall_s"] * 1000 / r["rows"]
        print(f"| {r['code']} | {r['rows']:,} | {r['wall_s']} | {r['first_commit_s']} | {per_row:.2f} "
              f"| {r['driver_peak_rss_mb']} | {r['driver_cpu_s']} | {r['ok']} | {r['load']} |")
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
