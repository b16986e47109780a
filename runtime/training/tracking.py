"""Live training curves: rank 0 sends loss, learning rate, gradient norm and tokens/s to the
run's MLflow run while it trains, and the registered model version links to that run.

MLflow is imported and its client built before the loop starts (a few seconds of CPU that would
otherwise compete with the first steps). In the loop, ``log`` only appends to a queue; a daemon
thread writes the first point at once, then what has queued up with one ``log_batch`` call at
most every ``flush_every_s`` seconds, so the curve lags by seconds and the writes cost well under
1% of a core. Logging is best effort: a tracking store that cannot be reached is reported once
and training goes on.
"""

from __future__ import annotations

import os
import queue
import threading
import time

from runtime.log import note

_STOP = object()


def _reachable(uri: str) -> bool:
    # A SQLite store on another node's disk: MLflow would silently create an empty database here.
    if uri.startswith("sqlite:///"):
        return os.path.isfile(uri.removeprefix("sqlite:///"))
    return True


class LiveCurves:
    """``log(step, **metrics)`` from the loop; ``close()`` flushes (bounded) at the end."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0):
        self.uri, self.run_id, self.flush_every_s = tracking_uri, run_id, flush_every_s
        self._client = self._connect()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="raylane-mlflow", daemon=True)
        self._thread.start()

    def _connect(self):
        if not _reachable(self.uri):
            self._warn(f"the tracking store {self.uri} is not on this node")
            return None
        try:
            import logging

            from mlflow.tracking import MlflowClient

            logging.getLogger("alembic").setLevel(logging.WARNING)
            return MlflowClient(tracking_uri=self.uri)
        except Exception as e:  # noqa: BLE001 - never fail training on its curves
            self._warn(e)
            return None

    def log(self, step: int, **metrics: float) -> None:
        self._q.put((step, int(time.time() * 1000), metrics))

    def close(self, timeout_s: float = 30.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout_s)

    def _drain(self) -> None:
        client, stop, last_write = self._client, False, -float("inf")
        while not stop:
            items = [self._q.get()]
            deadline = last_write + self.flush_every_s  # the first point goes out at once
            while items[-1] is not _STOP:  # what arrives within flush_every_s goes in the same request
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    items.append(self._q.get(timeout=left))
                except queue.Empty:
                    break
            stop = items[-1] is _STOP
            if client is None:
                continue
            from mlflow.entities import Metric

            batch = [Metric(k, float(v), ts, step) for it in items if it is not _STOP
                     for step, ts, metrics in [it] for k, v in metrics.items() if v is not None]
            last_write = time.monotonic()
            try:
                for i in range(0, len(batch), 1000):  # log_batch's per-request limit
                    client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            except Exception as e:  # noqa: BLE001
                self._warn(e)
                client = None

    @staticmethod
    def _warn(e) -> None:
        note("raylane", f"live MLflow curves off: {e}")
