"""Quickstart stage: the release loop closed, on the app the serve stage left up.

>>> from runtime.release.quickstart import stage_release
>>> stage_release(ctx)      # ctx: runtime.quickstart.QuickstartContext  # doctest: +SKIP

``jobs.drift_check``'s path (``check_drift``): the champion adapter is evaluated on "recent" data
of another kind, has drifted, so a fresh fine-tune runs; it passes the eval gate, and its
``release:`` starts a rollout on the serving app instead of moving ``champion``. The app's replica
starts the rollout's controller on the cluster; clients (one API key each, so both arms get
traffic) send requests while the candidate walks 50 % -> 100 % and is promoted. Every request
must succeed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from runtime.log import logger
from runtime.specs import dump_spec, parse_spec

_log = logger("quickstart")
# Short steps for a demo on a shared CPU; a real rollout keeps the defaults (minutes per step).
ROLLOUT = {"steps": [50, 100], "min_step_s": 2, "min_requests": 4, "interval_s": 1, "failure_limit": 2,
           "max_hold_s": 60, "checks": {"max_ttft_p95_ratio": 2.0, "max_e2e_p95_ratio": 2.0}}
CLIENTS = 4


def write_recent_data(path: Path, rows: int = 120) -> None:
    """Traffic of another kind than the support tickets the champion was tuned on: drift."""
    import random

    rng = random.Random(7)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": f"Invoice {i}: {rng.randint(2, 90)} units of part "
                                        f"{rng.choice('QXZJ')}{rng.randint(100, 999)} shipped to depot "
                                        f"{rng.randint(1, 40)} on day {rng.randint(1, 365)}."}) + "\n")


class Clients:
    """``CLIENTS`` threads sending completions for the stable id, each request with the next key."""

    def __init__(self, url: str, keys: list[str], model: str):
        self.url, self.keys, self.model = url, keys, model
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.failed: list[str] = []
        self.arms: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _run(self, i: int) -> None:
        import httpx

        n = i
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                key = self.keys[n % len(self.keys)]
                n += CLIENTS
                try:
                    r = c.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": self.model, "prompt": "My router", "max_tokens": 8,
                                     "temperature": 0})
                    problem = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                    arm = r.headers.get("x-raylane-arm", "none")
                except httpx.HTTPError as e:
                    problem, arm = f"{type(e).__name__}: {e}", "none"
                with self.lock:
                    self.sent += 1
                    self.arms[arm] = self.arms.get(arm, 0) + 1
                    if problem:
                        self.failed.append(problem)


def stage_release(ctx) -> dict:
    from runtime import release
    from runtime.registry import CHAMPION, Registry
    from runtime.serving.quickstart import stop_serving
    from runtime.training import check_drift

    if ctx.serving is None:
        raise RuntimeError("the release stage needs the serve stage's app, serving the adapter by registry alias")
    serve_spec, url = ctx.serving
    try:
        name = ctx.results["train"]["finetune"]["registry"]["name"]
        reg = Registry(str(ctx.workdir))
        before = reg.alias(name, CHAMPION).version
        data_dir = Path(ctx.workdir) / "data"
        recent = data_dir / "recent.jsonl"
        write_recent_data(recent)
        spec = parse_spec({
            "kind": "FineTune", "name": name, "base_model": str(ctx.model_dir),
            "storage": {"root": str(ctx.workdir)}, "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "data": {"path": str(data_dir / "train.jsonl"), "max_seq_len": 64},
            "lora": {"rank": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"steps": 40, "batch_size": 4, "learning_rate": 3e-3, "checkpoint_every_n_steps": 20},
            "drift": {"data": {"path": str(recent), "max_seq_len": 64}, "max_degradation": 0.005},  # the tiny model barely learns: its drift is small
            "release": {"serve": dump_spec(serve_spec), "rollout": ROLLOUT},
        })
        _log(f"drift check of {name} v{before} on recent data, then fine-tune -> gate -> rollout ...")
        drift = check_drift(spec)
        tuned = drift.finetune or {}
        rel = (tuned.get("gate") or {}).get("release") or {}
        if not rel.get("started"):
            raise RuntimeError(f"no rollout started: drift {drift.action} ({drift.degradation}), gate "
                               f"{(tuned.get('gate') or {}).get('reason')}, release {rel}")
        app = rel["app"]
        t0 = time.monotonic()
        with Clients(url, ctx.api_keys, rel["model_id"]) as clients:
            state = release.rollout_status(app, str(ctx.workdir))
            while not state.done and time.monotonic() - t0 < 120:
                time.sleep(0.5)
                state = release.rollout_status(app, str(ctx.workdir))
        seconds = round(time.monotonic() - t0, 1)
        if state.state != "promoted":
            raise RuntimeError(f"rollout {app!r} ended {state.state} after {seconds} s: {state.reason}")
        if clients.failed:
            raise RuntimeError(f"{len(clients.failed)} of {clients.sent} client requests failed during the rollout, "
                               f"e.g. {clients.failed[0]}")
        deadline = time.monotonic() + 30  # the controller saves 'promoted', then moves the alias
        while (after := reg.alias(name, CHAMPION).version) == before and time.monotonic() < deadline:
            time.sleep(0.5)
        _log(f"rollout {state.rollout_id}: {state.candidate} promoted in {seconds} s ({clients.sent} requests, "
             f"0 failed); champion v{before} -> v{after}")
        return {"app": app, "rollout_id": state.rollout_id, "state": state.state, "candidate": state.candidate,
                "champion_before": before, "champion_after": after, "steps": state.steps,
                "decisions": [{k: h.get(k) for k in ("step", "verdict", "reason")} for h in state.history
                              if h["verdict"] != "hold"],
                "rollout_seconds": seconds, "requests": clients.sent, "failed": len(clients.failed), "arms": clients.arms,
                "drift": {"degradation": drift.degradation, "action": drift.action, "run": drift.run_name},
                "gate": tuned.get("gate"), "status": f"raylane rollout status {app} --storage-root {ctx.workdir}"}
    finally:
        ctx.serving = None
        stop_serving(serve_spec.name)
