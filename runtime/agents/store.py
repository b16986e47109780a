"""Durable sessions: the whole session record is written after every step.

>>> from runtime.agents.store import SQLiteStore
>>> store = SQLiteStore("/tmp/sessions.db")                 # doctest: +SKIP
>>> store.save({"id": "s1", "messages": [], "steps": []})   # doctest: +SKIP

Two implementations of one small Protocol: SQLite (the default, one file under the storage
root) and Redis (shared by every node of a cluster). A session is one JSON document keyed by id;
writing it whole after each step keeps resume trivial: whoever picks the session up next reads
the last complete record, so a killed actor loses at most the step that was in flight.

A session records its ``owner`` (a digest of the API key that created it, or None); ``create``
counts the owner's sessions and inserts in one atomic step, so a per-key quota holds even when
several session actors create at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from runtime.errors import RaylaneError
from runtime.shared_paths import require_shared


class SessionStore(Protocol):
    def load(self, session_id: str) -> dict[str, Any] | None: ...

    def save(self, session: dict[str, Any]) -> None: ...

    def create(self, session: dict[str, Any], max_per_owner: int | None = None) -> bool:
        """Insert a new session; False (nothing written) when its owner already holds ``max_per_owner``."""
        ...

    def delete(self, session: dict[str, Any]) -> None: ...

    def count(self, owner: str | None) -> int: ...

    def list_ids(self) -> list[str]: ...


class SQLiteStore:
    """Sessions in one SQLite file (WAL mode: many readers, one writer at a time)."""

    def __init__(self, path: str | Path):
        self.path = str(Path(path).expanduser())
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        c = self._conn()
        c.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, doc TEXT NOT NULL, updated REAL NOT NULL, "
                  "owner TEXT)")
        if "owner" not in {row[1] for row in c.execute("PRAGMA table_info(sessions)")}:
            try:  # a store from before sessions had owners: its sessions keep owner NULL
                c.execute("ALTER TABLE sessions ADD COLUMN owner TEXT")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):  # another actor migrated it first
                    raise
        c.execute("CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner)")

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

    def create(self, session: dict[str, Any], max_per_owner: int | None = None) -> bool:
        # One statement: SQLite takes the write lock before the count, so concurrent creates
        # by one owner cannot both pass the quota.
        row = (session["id"], json.dumps(session), time.time(), session.get("owner"))
        if max_per_owner is None or session.get("owner") is None:
            cur = self._conn().execute("INSERT INTO sessions (id, doc, updated, owner) VALUES (?, ?, ?, ?)", row)
        else:
            cur = self._conn().execute(
                "INSERT INTO sessions (id, doc, updated, owner) SELECT ?, ?, ?, ? "
                "WHERE (SELECT COUNT(*) FROM sessions WHERE owner = ?) < ?",
                (*row, session["owner"], max_per_owner))
        return cur.rowcount == 1

    def delete(self, session: dict[str, Any]) -> None:
        self._conn().execute("DELETE FROM sessions WHERE id = ?", (session["id"],))

    def count(self, owner: str | None) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM sessions WHERE owner IS ?", (owner,)).fetchone()[0]

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
    """Sessions as JSON strings under ``<prefix>:doc:<id>``; the index of all ids is the sorted
    set ``<prefix>:index`` and each owner's ids are ``<prefix>:owner:<digest>``. Documents and
    indexes live in separate namespaces, so no session id can name an index key."""

    # KEYS: doc, index, owner index. ARGV: doc JSON, id, time, max sessions per owner (0: none).
    _CREATE = """
    if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
    local limit = tonumber(ARGV[4])
    if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then return 0 end
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
    redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
    return 1
    """

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
        self._create = self._r.register_script(self._CREATE)

    def _doc(self, session_id: str) -> str:
        return f"{self.prefix}:doc:{session_id}"

    def _index(self) -> str:
        return f"{self.prefix}:index"

    def _owned(self, owner: str | None) -> str:
        return f"{self.prefix}:owner:{owner or '-'}"

    def load(self, session_id: str) -> dict[str, Any] | None:
        doc = self._r.get(self._doc(session_id))
        return json.loads(doc) if doc else None

    def save(self, session: dict[str, Any]) -> None:
        pipe = self._r.pipeline()
        pipe.set(self._doc(session["id"]), json.dumps(session))
        pipe.zadd(self._index(), {session["id"]: time.time()})
        pipe.execute()

    def create(self, session: dict[str, Any], max_per_owner: int | None = None) -> bool:
        owner = session.get("owner")
        limit = max_per_owner if (max_per_owner is not None and owner is not None) else 0
        done = self._create(keys=[self._doc(session["id"]), self._index(), self._owned(owner)],
                            args=[json.dumps(session), session["id"], time.time(), limit])
        if done == -1:
            raise RaylaneError(f"session {session['id']!r} already exists in the store")
        return done == 1

    def delete(self, session: dict[str, Any]) -> None:
        pipe = self._r.pipeline()
        pipe.delete(self._doc(session["id"]))
        pipe.zrem(self._index(), session["id"])
        pipe.zrem(self._owned(session.get("owner")), session["id"])
        pipe.execute()

    def count(self, owner: str | None) -> int:
        return int(self._r.zcard(self._owned(owner)))

    def list_ids(self) -> list[str]:
        return [i.decode() for i in self._r.zrange(self._index(), 0, -1)]


def default_sqlite_path(run_dir: str) -> str:
    return f"{run_dir}/sessions.db"


def check_shared(backend: str, url: str | None, run_dir: str) -> None:
    """Refuse a SQLite store that some node of a multi-node cluster cannot see (Redis is shared by
    construction). Session actors land on any node, so the file must be one file for all of them."""
    target = url or default_sqlite_path(run_dir)
    if backend != "sqlite" or "://" in target:  # a URI is refused by open_store with its own message
        return
    path = Path(target).expanduser()
    require_shared(str(path.parent), field="sessions", fix=(
        "use sessions: {backend: redis, url: redis://HOST:6379/0} (a store every node reaches), or put "
        "storage.root (or sessions.url) on a folder mounted at the same path on every node"))


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
