"""Per-arm request windows: each serving replica counts what each arm served in the current step
and writes its counts under the storage root; the controller adds every replica's up.

>>> from runtime.release.windows import ArmRecorder, read_windows
>>> rec = ArmRecorder("~/.raylane", "chat")                        # one per replica
>>> rec.record("r1", 0, "candidate", ok=True, ttft_s=0.2, e2e_s=1.1)
>>> rec.flush()                                                     # doctest: +SKIP
>>> read_windows("~/.raylane", "chat", "r1", 0)["candidate"].requests   # doctest: +SKIP
1

Files: ``<root>/rollouts/<app>/windows/<rollout id>/step-<k>/<replica>.json``, one per replica
and step, rewritten whole (atomically) on each flush, so shared storage (a ReadWriteMany volume
or s3://) is all the replicas and the controller share: no Ray hop, any number of nodes.
"""

from __future__ import annotations

import json
import random
import threading
import uuid

from runtime import storage
from runtime.release.decide import ArmWindow, p95

ARMS = ("champion", "candidate")
# Latency samples kept per arm per replica per step (a uniform reservoir beyond that).
MAX_SAMPLES = 2048


def windows_dir(storage_root: str, app: str, rollout_id: str, step: int) -> str:
    return storage.join(storage_root, "rollouts", app, "windows", rollout_id, f"step-{step:03d}")


class _Arm:
    def __init__(self):
        self.requests = self.errors = 0
        self.ttft: list[float] = []
        self.e2e: list[float] = []

    def add(self, ok: bool, ttft_s: float | None, e2e_s: float | None) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        for samples, v in ((self.ttft, ttft_s), (self.e2e, e2e_s)):
            if v is None or not ok:
                continue
            if len(samples) < MAX_SAMPLES:
                samples.append(v)
            else:
                i = random.randrange(self.requests)
                if i < MAX_SAMPLES:
                    samples[i] = v

    def to_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "ttft_s": self.ttft, "e2e_s": self.e2e}


class ArmRecorder:
    """What one replica's arms served, per (rollout, step); ``flush`` writes it out."""

    def __init__(self, storage_root: str, app: str, replica: str | None = None):
        self.storage_root, self.app = storage_root, app
        self.replica = replica or uuid.uuid4().hex[:12]
        self._arms: dict[tuple[str, int], dict[str, _Arm]] = {}
        self._dirty: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        # One flush at a time: two overlapping ones could land an older snapshot last.
        self._flush_lock = threading.Lock()

    def record(self, rollout_id: str, step: int, arm: str, *, ok: bool, ttft_s: float | None = None,
               e2e_s: float | None = None) -> None:
        with self._lock:
            if (rollout_id, step) not in self._arms:
                # a new rollout: an earlier one's counts are written already (or never will be)
                self._arms = {k: v for k, v in self._arms.items() if k[0] == rollout_id or k in self._dirty}
            arms = self._arms.setdefault((rollout_id, step), {a: _Arm() for a in ARMS})
            arms[arm].add(ok, ttft_s, e2e_s)
            self._dirty.add((rollout_id, step))

    def flush(self) -> None:
        """Write every (rollout, step) that changed since the last flush: this replica's totals."""
        with self._flush_lock:
            with self._lock:
                todo = [(k, {a: arm.to_dict() for a, arm in self._arms[k].items()}) for k in self._dirty]
                self._dirty.clear()
            for (rid, step), data in todo:
                path = storage.join(windows_dir(self.storage_root, self.app, rid, step), f"{self.replica}.json")
                try:
                    storage.write_bytes_atomic(path, json.dumps(data).encode())
                except Exception:
                    with self._lock:
                        self._dirty.add((rid, step))  # written by the next flush
                    raise


def read_windows(storage_root: str, app: str, rollout_id: str, step: int) -> dict[str, ArmWindow]:
    """Every replica's counts for (rollout, step) added up: one ``ArmWindow`` per arm (no quality)."""
    fs, _ = storage.resolve(storage_root)
    totals = {a: {"requests": 0, "errors": 0, "ttft_s": [], "e2e_s": []} for a in ARMS}
    for path in storage.list_files(windows_dir(storage_root, app, rollout_id, step), ".json"):
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
        for arm in ARMS:
            got = data.get(arm) or {}
            t = totals[arm]
            t["requests"] += int(got.get("requests", 0))
            t["errors"] += int(got.get("errors", 0))
            t["ttft_s"] += got.get("ttft_s", [])
            t["e2e_s"] += got.get("e2e_s", [])
    return {a: ArmWindow(t["requests"], t["errors"], p95(t["ttft_s"]), p95(t["e2e_s"])) for a, t in totals.items()}
