"""One writer per batch output folder: a lease in ``OUTPUT/_lease.json``.

>>> with OutputLease("/tmp/out", holder="run-1"):      # doctest: +SKIP
...     ...  # plan, generate, commit: nobody else writes here meanwhile

The lease names its holder (run id, host, pid), its last heartbeat and its expiry. The holder
renews it from a background thread every ``ttl_s / 3``; a run that finds a live lease exits
with an error naming the holder (or, with ``wait``, polls until it is free). A lease whose
holder stopped renewing (a killed driver) expires after ``ttl_s`` and the next run takes it over;
on the holder's own machine a lease whose process is gone is taken over at once.

How "take it" is made exclusive:

* local folders (and POSIX shared filesystems): ``O_CREAT | O_EXCL``, so exactly one of two
  racing runs creates the file. Taking over an expired lease is also exclusive: the taker first
  creates ``_lease.json.takeover-<token of the expired lease>`` with ``O_EXCL``, so one taker wins
  per expired lease, then atomically replaces the lease file.
* object stores (s3://, gs://): pyarrow exposes no conditional put, so the fallback is
  check-then-put, then a read-back after ``SETTLE_S``: of two runs that put within that window,
  the one whose read-back shows another holder's token backs off. Two runs that start within
  the same few hundred milliseconds can in principle both pass; schedule ticks and retries are
  far apart, which is what this guards against. (S3 ``If-None-Match`` conditional writes would
  close the window; they need boto3, which raylane does not depend on.)

Expiry compares wall clocks of different machines: keep ``ttl_s`` well above clock skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Self

from runtime import storage
from runtime.errors import RaylaneError

LEASE = "_lease.json"
TTL_S = 120.0  # a holder that misses this long (3 heartbeats) is presumed dead
SETTLE_S = 2.0  # object stores: wait before the read-back that confirms the put won
POLL_S = 5.0  # --wait: how often to look again


class LeaseHeld(RaylaneError):
    """Another run holds the output folder's lease."""


@dataclass
class LeaseInfo:
    holder: str
    token: str
    host: str
    pid: int
    taken_at: float
    heartbeat_at: float
    expires_at: float
    ttl_s: float
    pid_namespace: str = ""  # with host: tells whether ``pid`` is a process this machine can see

    def dead_here(self) -> bool:
        """The holder ran on this host, in this pid namespace, and its process is gone (a killed
        driver rerun at once on the same machine need not wait for the expiry)."""
        if self.host != socket.gethostname() or self.pid_namespace != _pid_namespace() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # exists, owned by someone else
        return False

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"run {self.holder} on {self.host} (pid {self.pid}), last heartbeat "
                f"{max(0.0, now - self.heartbeat_at):.0f}s ago, expires in {max(0.0, self.expires_at - now):.0f}s")


class OutputLease:
    """The single-writer lease on ``output``; ``acquire`` before any work, ``release`` after."""

    def __init__(self, output: str, holder: str, *, ttl_s: float = TTL_S):
        self.output, self.holder, self.ttl_s = output, holder, float(ttl_s)
        self.uri = storage.join(output, LEASE)
        self.token = uuid.uuid4().hex
        self.local = not storage.is_remote(output)
        self.lost: str | None = None  # set by the heartbeat when another run took the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._takeover_marker: str | None = None

    # -- public -------------------------------------------------------------------------------

    def acquire(self, *, wait: bool = False, poll_s: float = POLL_S) -> OutputLease:
        """Take the lease, or raise ``LeaseHeld`` naming the holder (``wait``: poll until free)."""
        storage.makedirs(self.output)
        while True:
            current = self._try_take()
            if current is None:
                break
            if not wait:
                raise LeaseHeld(
                    f"output {self.output!r} is being written by another {current.describe()}",
                    hint="wait for it to finish (or pass --wait to queue behind it), or write to another "
                    f"output.path; a lease whose holder died expires by itself after {current.ttl_s:.0f}s",
                )
            time.sleep(poll_s)
        self._thread = threading.Thread(target=self._beat, name="raylane-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise if the heartbeat found another holder (this run must not commit any more)."""
        if self.lost:
            raise LeaseHeld(
                f"lost the lease on {self.output!r}: {self.lost}",
                hint="this run stopped committing; the other run finishes the folder (or rerun later)",
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        cur = self._read()
        if cur is not None and cur.token == self.token:
            _delete(self.uri)
        if self._takeover_marker:
            _delete(self._takeover_marker)

    def __enter__(self) -> Self:
        return self.acquire() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ----------------------------------------------------------------------------

    def _info(self, taken_at: float | None = None) -> LeaseInfo:
        now = time.time()
        return LeaseInfo(holder=self.holder, token=self.token, host=socket.gethostname(), pid=os.getpid(),
                         taken_at=taken_at or now, heartbeat_at=now, expires_at=now + self.ttl_s, ttl_s=self.ttl_s,
                         pid_namespace=_pid_namespace())

    def _encode(self, info: LeaseInfo) -> bytes:
        return json.dumps(asdict(info), indent=2).encode()

    def _read(self) -> LeaseInfo | None:
        try:
            data = storage.read_bytes(self.uri)
        except (FileNotFoundError, OSError):
            return None
        try:
            return LeaseInfo(**json.loads(data))
        except (ValueError, TypeError):
            # A torn or foreign file: treat as expired so it cannot block the folder forever.
            return LeaseInfo("unknown", "unreadable-" + str(len(data)), "?", 0, 0.0, 0.0, 0.0, 0.0)

    def _try_take(self) -> LeaseInfo | None:
        """None when this run now holds the lease, else the live holder."""
        if self._create():
            return None
        cur = self._read()
        if cur is None:
            return self._try_take()  # released between our create and read: try again
        if cur.expires_at > time.time() and not cur.dead_here():
            return cur
        if self._take_over(cur):
            return None
        return self._read() or cur

    def _create(self) -> bool:
        data = self._encode(self._info())
        if self.local:
            _, path = storage.resolve(self.uri)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            storage.fsync_dir(path.rsplit("/", 1)[0])
            return True
        if storage.exists(self.uri):
            return False
        storage.write_bytes_atomic(self.uri, data)
        return self._confirm()

    def _take_over(self, expired: LeaseInfo) -> bool:
        if self.local:
            marker = f"{self.uri}.takeover-{expired.token}"
            _, mpath = storage.resolve(marker)
            try:
                os.close(os.open(mpath, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False  # another run is taking this expired lease over
            cur = self._read()
            if cur is None or cur.token != expired.token:
                _delete(marker)
                return False  # renewed or replaced meanwhile
            storage.write_bytes_atomic(self.uri, self._encode(self._info()))
            self._takeover_marker = marker
            return True
        storage.write_bytes_atomic(self.uri, self._encode(self._info()))
        return self._confirm()

    def _confirm(self) -> bool:
        time.sleep(SETTLE_S)
        cur = self._read()
        return cur is not None and cur.token == self.token

    def _beat(self) -> None:
        taken = time.time()
        while not self._stop.wait(self.ttl_s / 3):
            cur = self._read()
            if cur is not None and cur.token != self.token:
                self.lost = f"taken over by {cur.describe()}"
                return
            try:
                storage.write_bytes_atomic(self.uri, self._encode(self._info(taken_at=taken)))
            except OSError:
                pass  # a missed heartbeat is retried; the lease lasts three of them


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _delete(uri: str) -> None:
    fs, path = storage.resolve(uri)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
