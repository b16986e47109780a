"""Durable sessions: the whole session record is written after every step.

>>> from runtime.agents.store import SQLiteStore
>>> store = SQLiteStore("/tmp/sessions.db")                 # doctest: +SKIP
>>> store.save({"id": "s1", "messages": [], "steps": []})   # doctest: +SKIP

Two implementations of one small Protocol: SQLite (the default, one file under the storage
root) and Redis (shared by every node of a cluster). A session is one JSON document keyed by id;
writing it whole after each step keeps resume trivial: whoever picks the session up next reads
the last complete record, so a killed actor loses at most the step that was in flight.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from runtime.errors import RaylaneError


class SessionStore(Protocol):
    def load(self, session_id: str) -> dict[str, Any] | None: ...

    def save(self, session: dict[str, Any]) -> None: ...

    def list_ids(self) -> list[str]: ...


class SQLiteStore:
    """Sessions in one SQLite file (WAL mode: many readers, one writer at a time)."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).expanduser())
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, doc TEXT NOT NULL, updated REAL NOT NULL)"
            )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def load(self, session_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT doc FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def save(self, session: dict[str, Any]) -> None:
        self._conn().execute(
            "INSERT INTO sessions (id, doc, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc, updated = excluded.updated",
            (session["id"], json.dumps(session), time.time()),
        )

    def list_ids(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT id FROM sessions ORDER BY updated")]


def _enable_wal(conn: sqlite3.Connection, attempts: int = 100) -> None:
    """Switching a new file to WAL takes an exclusive lock and SQLite does not wait for it (the
    busy timeout does not apply): session actors opening the store at once retry here."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 + 0.01 * attempt)


class RedisStore:
    """Sessions as JSON strings under ``<prefix>:<id>`` in Redis."""

    def __init__(self, url: str, prefix: str = "raylane:session"):
        import redis

        self.url = url
        self.prefix = prefix
        self._r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        try:
            self._r.ping()
        except redis.exceptions.ConnectionError as e:
            raise RaylaneError(
                f"cannot reach the session store at {url}: {e}",
                hint="start redis-server (or fix sessions.url), or use sessions.backend: sqlite",
            ) from None

    def load(self, session_id: str) -> dict[str, Any] | None:
        doc = self._r.get(f"{self.prefix}:{session_id}")
        return json.loads(doc) if doc else None

    def save(self, session: dict[str, Any]) -> None:
        pipe = self._r.pipeline()
        pipe.set(f"{self.prefix}:{session['id']}", json.dumps(session))
        pipe.zadd(f"{self.prefix}:ids", {session["id"]: time.time()})
        pipe.execute()

    def list_ids(self) -> list[str]:
        return [i.decode() for i in self._r.zrange(f"{self.prefix}:ids", 0, -1)]


def default_sqlite_path(run_dir: str) -> str:
    return f"{run_dir}/sessions.db"


def open_store(backend: str, url: str | None, run_dir: str, app_name: str = "agent") -> SessionStore:
    """The store a spec's ``sessions:`` section names."""
    if backend == "redis":
        return RedisStore(url or "", prefix=f"raylane:{app_name}:session")
    path = url or default_sqlite_path(run_dir)
    if "://" in path:
        raise RaylaneError(
            f"sessions.url {path!r}: the SQLite store needs a local path",
            hint="use a local path for SQLite, or backend: redis for a store shared by a cluster",
        )
    return SQLiteStore(path)
