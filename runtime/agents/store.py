"""Durable sessions: the whole session record is written after every step.

>>> from runtime.agents.store import SQLiteStore
>>> store = SQLiteStore("/tmp/sessions.db")                 # doctest: +SKIP
>>> store.save({"id": "s1", "messages": [], "steps": []})   # doctest: +SKIP

Two implementations of one small Protocol: SQLite (the default, one file under the storage
root) and Redis (shared by every node of a cluster). A session is one JSON document keyed by id;
writing it whole after each step keeps resume trivial: whoever picks the session up next reads
the last complete record, so a killed actor loses at most the step that was in flight.

Two writers never overwrite each other: a record carries a revision (``session["rev"]``, set by
``load`` and ``create``), and ``save`` writes only if the stored revision is still the one the
writer loaded (compare-and-set: ``UPDATE ... WHERE rev = ?`` in SQLite, a Lua script in Redis),
else it raises ``SessionConflict`` and nothing is written. A dict never stored (no ``rev``) is
inserted only if no record has its id. So a stale writer (a turn whose lease ran out, a session
actor of an old deployment) cannot lose what a newer one saved, budget usage included.

A turn also holds a short per-session lease (``acquire``/``renew``/``release``: holder and
expiry, kept apart from the record so renewing it never bumps the revision): a second turn on the
same session fails at once instead of running beside the first, and a lease whose holder died
expires and is taken over.

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


class SessionConflict(RaylaneError):
    """A save whose revision is stale: another writer saved the session (or deleted it) since
    this one loaded it. Nothing was written."""


class SessionStore(Protocol):
    def load(self, session_id: str) -> dict[str, Any] | None: ...

    def save(self, session: dict[str, Any]) -> None:
        """Write the record if the stored revision is ``session["rev"]`` (then bump it), else
        raise ``SessionConflict``."""
        ...

    def acquire(self, session_id: str, holder: str, ttl_s: float) -> bool:
        """Take (or extend, for the same holder) the session's lease; False while another holds it."""
        ...

    def renew(self, session_id: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease; False when ``holder`` no longer holds it (expired and taken over)."""
        ...

    def take_over(self, session_id: str, old: str, new: str, ttl_s: float) -> bool:
        """Give the lease to ``new`` if ``old`` (known dead) still holds it."""
        ...

    def release(self, session_id: str, holder: str) -> None: ...

    def lease(self, session_id: str) -> dict[str, Any] | None:
        """The live lease (``holder``, ``expires_in_s``), None when free."""
        ...

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
                  "owner TEXT, rev INTEGER NOT NULL DEFAULT 1)")
        # A store from before owners (NULL) or revisions (every record at revision 1).
        for column in ("owner TEXT", "rev INTEGER NOT NULL DEFAULT 1"):
            if column.split()[0] not in {row[1] for row in c.execute("PRAGMA table_info(sessions)")}:
                try:
                    c.execute(f"ALTER TABLE sessions ADD COLUMN {column}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):  # another actor migrated it first
                        raise
        c.execute("CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner)")
        c.execute("CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def load(self, session_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT doc, rev FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return {**json.loads(row[0]), "rev": row[1]} if row else None

    def save(self, session: dict[str, Any]) -> None:
        rev = session.get("rev")
        if rev is None:  # never stored: insert, unless the id is taken
            cur = self._conn().execute(
                "INSERT INTO sessions (id, doc, updated, owner, rev) VALUES (?, ?, ?, ?, 1) ON CONFLICT(id) DO NOTHING",
                (session["id"], json.dumps(session), time.time(), session.get("owner")))
        else:
            cur = self._conn().execute("UPDATE sessions SET doc = ?, updated = ?, rev = rev + 1 WHERE id = ? AND rev = ?",
                                       (json.dumps({**session, "rev": rev + 1}), time.time(), session["id"], rev))
        if cur.rowcount != 1:
            raise _conflict(session, self.load(session["id"]))
        session["rev"] = (rev or 0) + 1

    def acquire(self, session_id: str, holder: str, ttl_s: float) -> bool:
        now = time.time()
        cur = self._conn().execute(
            "INSERT INTO leases (id, holder, expires) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "holder = excluded.holder, expires = excluded.expires WHERE leases.expires <= ? OR leases.holder = excluded.holder",
            (session_id, holder, now + ttl_s, now))
        return cur.rowcount == 1

    def renew(self, session_id: str, holder: str, ttl_s: float) -> bool:
        cur = self._conn().execute("UPDATE leases SET expires = ? WHERE id = ? AND holder = ?",
                                   (time.time() + ttl_s, session_id, holder))
        return cur.rowcount == 1

    def take_over(self, session_id: str, old: str, new: str, ttl_s: float) -> bool:
        cur = self._conn().execute("UPDATE leases SET holder = ?, expires = ? WHERE id = ? AND holder = ?",
                                   (new, time.time() + ttl_s, session_id, old))
        return cur.rowcount == 1

    def release(self, session_id: str, holder: str) -> None:
        self._conn().execute("DELETE FROM leases WHERE id = ? AND holder = ?", (session_id, holder))

    def lease(self, session_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT holder, expires FROM leases WHERE id = ?", (session_id,)).fetchone()
        left = row[1] - time.time() if row else 0
        return {"holder": row[0], "expires_in_s": round(left, 3)} if left > 0 else None

    def create(self, session: dict[str, Any], max_per_owner: int | None = None) -> bool:
        # One statement: SQLite takes the write lock before the count, so concurrent creates
        # by one owner cannot both pass the quota.
        row = (session["id"], json.dumps({**session, "rev": 1}), time.time(), session.get("owner"))
        if max_per_owner is None or session.get("owner") is None:
            cur = self._conn().execute("INSERT INTO sessions (id, doc, updated, owner, rev) VALUES (?, ?, ?, ?, 1)", row)
        else:
            cur = self._conn().execute(
                "INSERT INTO sessions (id, doc, updated, owner, rev) SELECT ?, ?, ?, ?, 1 "
                "WHERE (SELECT COUNT(*) FROM sessions WHERE owner = ?) < ?",
                (*row, session["owner"], max_per_owner))
        if cur.rowcount == 1:
            session["rev"] = 1
        return cur.rowcount == 1

    def delete(self, session: dict[str, Any]) -> None:
        self._conn().execute("DELETE FROM sessions WHERE id = ?", (session["id"],))
        self._conn().execute("DELETE FROM leases WHERE id = ?", (session["id"],))

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
    """Sessions as JSON strings under ``<prefix>:doc:<id>``, their revision under ``<prefix>:rev:<id>``
    (absent: 1, a record from before revisions) and their lease under ``<prefix>:lease:<id>`` (the
    holder, expiring on the Redis server's clock); the index of all ids is the sorted set
    ``<prefix>:index`` and each owner's ids are ``<prefix>:owner:<digest>``. Documents and indexes
    live in separate namespaces, so no session id can name an index key."""

    # KEYS: doc, index, owner index, rev. ARGV: doc JSON, id, time, max sessions per owner (0: none).
    _CREATE = """
    if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
    local limit = tonumber(ARGV[4])
    if limit > 0 and redis.call('ZCARD', KEYS[3]) >= limit then return 0 end
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('SET', KEYS[4], 1)
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
    redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
    return 1
    """

    # KEYS: doc, rev, index. ARGV: doc JSON, expected revision (0: a new record), id, time.
    # Returns the new revision, or -1 (stale: nothing written).
    _SAVE = """
    local exists = redis.call('EXISTS', KEYS[1]) == 1
    local expected = tonumber(ARGV[2])
    if expected == 0 then
      if exists then return -1 end
    else
      if not exists or tonumber(redis.call('GET', KEYS[2]) or '1') ~= expected then return -1 end
    end
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('SET', KEYS[2], expected + 1)
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
    return expected + 1
    """

    # KEYS: lease. ARGV: holder, ttl ms, 1 to take a free lease (acquire) or 0 (renew only).
    _LEASE = """
    local held = redis.call('GET', KEYS[1])
    if held == ARGV[1] or (held == false and ARGV[3] == '1') then
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
      return 1
    end
    return 0
    """

    # KEYS: lease. ARGV: the dead holder, the new holder, ttl ms.
    _TAKE_OVER = """
    if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
    """

    _RELEASE = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
    return 0
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
        self._save = self._r.register_script(self._SAVE)
        self._lease = self._r.register_script(self._LEASE)
        self._release = self._r.register_script(self._RELEASE)
        self._take_over = self._r.register_script(self._TAKE_OVER)

    def _doc(self, session_id: str) -> str:
        return f"{self.prefix}:doc:{session_id}"

    def _rev(self, session_id: str) -> str:
        return f"{self.prefix}:rev:{session_id}"

    def _leased(self, session_id: str) -> str:
        return f"{self.prefix}:lease:{session_id}"

    def _index(self) -> str:
        return f"{self.prefix}:index"

    def _owned(self, owner: str | None) -> str:
        return f"{self.prefix}:owner:{owner or '-'}"

    def load(self, session_id: str) -> dict[str, Any] | None:
        doc, rev = self._r.mget(self._doc(session_id), self._rev(session_id))
        return {**json.loads(doc), "rev": int(rev or 1)} if doc else None

    def save(self, session: dict[str, Any]) -> None:
        sid, rev = session["id"], session.get("rev") or 0
        new = self._save(keys=[self._doc(sid), self._rev(sid), self._index()],
                         args=[json.dumps({**session, "rev": rev + 1}), rev, sid, time.time()])
        if new == -1:
            raise _conflict(session, self.load(sid))
        session["rev"] = int(new)

    def acquire(self, session_id: str, holder: str, ttl_s: float) -> bool:
        return self._lease(keys=[self._leased(session_id)], args=[holder, max(1, int(ttl_s * 1000)), 1]) == 1

    def renew(self, session_id: str, holder: str, ttl_s: float) -> bool:
        return self._lease(keys=[self._leased(session_id)], args=[holder, max(1, int(ttl_s * 1000)), 0]) == 1

    def take_over(self, session_id: str, old: str, new: str, ttl_s: float) -> bool:
        return self._take_over(keys=[self._leased(session_id)], args=[old, new, max(1, int(ttl_s * 1000))]) == 1

    def release(self, session_id: str, holder: str) -> None:
        self._release(keys=[self._leased(session_id)], args=[holder])

    def lease(self, session_id: str) -> dict[str, Any] | None:
        pipe = self._r.pipeline()
        pipe.get(self._leased(session_id))
        pipe.pttl(self._leased(session_id))
        holder, ms = pipe.execute()
        return {"holder": holder.decode(), "expires_in_s": round(ms / 1000, 3)} if holder and ms > 0 else None

    def create(self, session: dict[str, Any], max_per_owner: int | None = None) -> bool:
        owner = session.get("owner")
        limit = max_per_owner if (max_per_owner is not None and owner is not None) else 0
        done = self._create(keys=[self._doc(session["id"]), self._index(), self._owned(owner), self._rev(session["id"])],
                            args=[json.dumps({**session, "rev": 1}), session["id"], time.time(), limit])
        if done == -1:
            raise RaylaneError(f"session {session['id']!r} already exists in the store")
        if done == 1:
            session["rev"] = 1
        return done == 1

    def delete(self, session: dict[str, Any]) -> None:
        pipe = self._r.pipeline()
        pipe.delete(self._doc(session["id"]), self._rev(session["id"]), self._leased(session["id"]))
        pipe.zrem(self._index(), session["id"])
        pipe.zrem(self._owned(session.get("owner")), session["id"])
        pipe.execute()

    def count(self, owner: str | None) -> int:
        return int(self._r.zcard(self._owned(owner)))

    def list_ids(self) -> list[str]:
        return [i.decode() for i in self._r.zrange(self._index(), 0, -1)]


def _conflict(session: dict[str, Any], stored: dict[str, Any] | None) -> SessionConflict:
    # The fix is in the message: a hint does not survive Ray's pickling of a session actor's error.
    sid, rev = session["id"], session.get("rev")
    if rev is None:
        return SessionConflict(f"session {sid!r} already exists in the store; load it to continue it")
    if stored is None:
        return SessionConflict(f"session {sid!r} was deleted while this request changed it; nothing was saved "
                               "(start a new session with POST /sessions)")
    return SessionConflict(
        f"session {sid!r} was saved by another request since this one loaded it (revision {stored['rev']}, "
        f"not {rev}); nothing was saved, so the other request's steps and budget usage stand "
        f"(GET /sessions/{sid} shows them; send the message again)")


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
