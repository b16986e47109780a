"""The data plane of a batch run: every row is read, digested, tokenized, generated and written
in Ray workers; the driver holds per-shard state only (pieces, digests, commit records).

Shards are fixed slices of the input's global row order (files sorted by name, rows in file
order), cut from per-file row counts (parquet: its footer; jsonl/csv: a task reads the file),
so no pass over the rows happens in the driver. A shard is a list of ``Piece``s: rows
``[lo, hi)`` of one file. The stages:

1. ``digest_shards`` tasks read their shards' pieces and return the per-shard digests the plan
   pins (ids in order, prompts, the id set); one ``check_ids`` task gets every shard's ids (as
   Ray object refs, never through the driver) and proves them unique;
2. ``Prepare`` (a CPU actor pool, ``prep_workers`` x ``prep_cpus``): reads a shard's pieces,
   applies the chat template, tokenizes, and routes empty, malformed and over-long prompts
   straight to the writer as error rows; the rest go on as engine rows;
3. the ``ray.data.llm`` vLLM engine stage (``runtime.batch.engine``);
4. ``Forward`` (one small actor) hands engine rows, grouped by shard, to the ``ShardWriter``
   actor, which keeps each shard's rows until its last one arrives (Ray Data reorders rows, and
   a retried task sends some twice: the first copy wins), then commits the shard: file, then
   commit record, atomically, after checking that this run still holds the folder's lease.

``LocalExecutor`` runs the task stages in-process (the fast tests' stand-in for Ray tasks).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from runtime import storage
from runtime.batch import shards as sh
from runtime.errors import RaylaneError

# ---------------------------------------------------------------------------------------------
# Pieces: shards as slices of files


@dataclass(frozen=True)
class Piece:
    file: str
    lo: int
    hi: int


def shard_pieces(files: list[str], counts: list[int], rows_per_shard: int
                 ) -> tuple[list[tuple[int, int]], list[list[Piece]]]:
    """Global shard ranges and, per shard, the file slices that hold its rows."""
    total = sum(counts)
    ranges = sh.shard_ranges(total, rows_per_shard)
    pieces: list[list[Piece]] = [[] for _ in ranges]
    offset = 0
    for f, n in zip(files, counts, strict=True):
        lo, hi = offset, offset + n
        offset = hi
        for s in range(lo // rows_per_shard, (hi - 1) // rows_per_shard + 1) if n else ():
            a, b = max(lo, ranges[s][0]), min(hi, ranges[s][1])
            if a < b:
                pieces[s].append(Piece(f, a - lo, b - lo))
    return ranges, pieces


_CACHE: OrderedDict[tuple, pa.Table] = OrderedDict()
_CACHE_FILES = 2  # consecutive shards mostly come from the same file: read it once per worker


def read_file(root: str, fmt: str, file: str) -> pa.Table:
    fs, _ = storage.resolve(root)
    info = fs.get_file_info(file)  # a file rewritten in place is read again
    key = (file, fmt, info.size, info.mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    table = sh.read_file(fs, file, fmt)
    _CACHE[key] = table
    while len(_CACHE) > _CACHE_FILES:
        _CACHE.popitem(last=False)
    return table


def count_rows(root: str, fmt: str, file: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        fs, _ = storage.resolve(root)
        try:
            with fs.open_input_file(file) as f:
                return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise RaylaneError(f"cannot read input file {file} as parquet: {e}", hint="check input.format") from None
    return read_file(root, fmt, file).num_rows


def read_pieces(root: str, fmt: str, pieces: list[Piece]) -> pa.Table:
    tables = [read_file(root, fmt, p.file).slice(p.lo, p.hi - p.lo) for p in pieces]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


# ---------------------------------------------------------------------------------------------
# Plan digests (tasks)


def digest_shards(root: str, fmt: str, shards: list[list[Piece]], id_col: str, text_col: str
                  ) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Per shard: its digests (or the user error its rows make), and its ids for ``check_ids``."""
    out, ids_out = [], []
    for pieces in shards:
        table = read_pieces(root, fmt, pieces)
        try:
            ids = sh.check_columns(table, id_col, text_col)
        except RaylaneError as e:
            out.append({"error": e.message, "hint": e.hint})
            ids_out.append([])
            continue
        ordered, prompts = sh.shard_digests(ids, table.column(text_col).to_pylist())
        out.append({"rows": len(ids), "ids": ordered, "prompts": prompts, "idset": sh.ids_digest(ids)})
        ids_out.append(ids)
    return out, ids_out


def check_ids(*id_lists: list[list[str]]) -> dict[str, Any]:
    """Across every shard: duplicate ids (a sample) and the id-set digest the plan records."""
    ids = [i for group in id_lists for shard in group for i in shard]
    ids.sort()
    dups = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    return {"duplicates": len(dups), "sample": dups[:3], "ids_sha256": sh.ids_digest(ids)}


def check_committed(out: str, rec: sh.CommitRecord) -> str | None:
    problem, _ = sh.shard_file_problem(out, rec)
    return problem


def verify_shard(out: str, fmt: str, rec: sh.CommitRecord, idset: str | None) -> dict[str, Any]:
    """One committed shard, as ``verify_output`` checks it, plus its ids against the plan's."""
    problems: list[str] = []
    problem, data = sh.shard_file_problem(out, rec)
    if problem:
        problems.append(problem)
    if data is None:
        return {"problems": problems, "rows_out": 0, "rows_error": 0}
    try:
        rows = sh.decode_rows(data, fmt)
    except ValueError as e:
        return {"problems": problems + [f"{rec.file}: unreadable ({e})"], "rows_out": 0, "rows_error": 0}
    digest = sh.ids_digest(str(r.get("id")) for r in rows)
    if len(rows) != rec.rows or digest != rec.ids_sha256:
        problems.append(f"{rec.file}: {len(rows)} rows, committed {rec.rows} (ids differ from the commit record)")
    elif idset and digest != idset:
        problems.append(f"{rec.file}: its ids are not the ids of input shard {rec.shard}")
    errors = sum(1 for r in rows if r.get("error"))
    return {"problems": problems, "rows_out": len(rows) - errors, "rows_error": errors}


# ---------------------------------------------------------------------------------------------
# Executors: Ray tasks, or in-process


class LocalExecutor:
    """The task stages in this process (fast tests; nothing distributed)."""

    def map(self, fn, calls: list[tuple], num_cpus: float = 1.0) -> list[Any]:
        return [fn(*c) for c in calls]

    def digest(self, calls: list[tuple], num_cpus: float = 1.0) -> tuple[list[dict], dict]:
        parts = [digest_shards(*c) for c in calls]
        return [d for p in parts for d in p[0]], check_ids(*[p[1] for p in parts])


class RayExecutor:
    """The task stages as Ray tasks; results come back in call order, a bounded number in flight.
    ``labels``: the Ray label selector the tasks run under (``prep_node_labels``)."""

    def __init__(self, in_flight: int = 64, labels: dict[str, str] | None = None):
        self.in_flight = in_flight
        self.options = {"label_selector": dict(labels)} if labels else {}

    def _run(self, remote, calls: list[tuple]) -> list[Any]:
        import ray

        refs = [remote.remote(*c) for c in calls]
        return ray.get(refs)

    def map(self, fn, calls: list[tuple], num_cpus: float = 1.0) -> list[Any]:
        import ray

        if not calls:
            return []
        return _unwrap(lambda: self._run(ray.remote(num_cpus=num_cpus, max_retries=3, **self.options)(fn), calls))

    def digest(self, calls: list[tuple], num_cpus: float = 1.0) -> tuple[list[dict], dict]:
        import ray

        def go():
            task = ray.remote(num_cpus=num_cpus, num_returns=2, max_retries=3, **self.options)(digest_shards)
            pairs = [task.remote(*c) for c in calls]
            # The ids travel worker to worker (object refs): the driver holds only the digests.
            checked = ray.remote(num_cpus=num_cpus, max_retries=3, **self.options)(check_ids).remote(
                *[p[1] for p in pairs])
            digests = ray.get([p[0] for p in pairs])
            return [d for part in digests for d in part], ray.get(checked)

        return _unwrap(go)


def _unwrap(fn):
    """A user error raised in a task (a bad input file) surfaces as itself, not a RayTaskError."""
    import ray

    try:
        return fn()
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
        if isinstance(cause, RaylaneError):
            raise RaylaneError(getattr(cause, "message", str(cause)), hint=getattr(cause, "hint", None)) from None
        raise


def digest_calls(root: str, fmt: str, pieces: list[list[Piece]], id_col: str, text_col: str,
                 shards_per_task: int) -> list[tuple]:
    return [(root, fmt, pieces[i:i + shards_per_task], id_col, text_col)
            for i in range(0, len(pieces), shards_per_task)]


# ---------------------------------------------------------------------------------------------
# Writer


def error_row(row_id: str, reason: str) -> dict[str, Any]:
    return {"id": row_id, "output": None, "error": reason, "num_input_tokens": 0, "num_output_tokens": 0}


class ShardWriter:
    """Groups rows by shard and commits each shard when its last row arrives (a Ray actor in a
    run; ``LocalExecutor`` runs use it in-process). Exactly once: a row seen again (a retried
    task) or a row of a committed shard is dropped.

    Restartable: Ray restarts the actor when its process or node dies (``max_restarts``), with the
    same arguments. The new writer adopts the commit records this run already wrote (the driver
    hears of them again and counts each shard once), so a shard is never committed twice; the
    rows the old writer held in memory are gone, so their shards stay incomplete and
    ``restarted`` tells the driver to run them again."""

    def __init__(self, out: str, fmt: str, run_id: str, expected: dict[int, int],
                 lease_uri: str | None = None, lease_token: str | None = None):
        self.out, self.fmt, self.run_id = out, fmt, run_id
        self.expected = dict(expected)
        self.buffers: dict[int, dict[str, dict]] = {i: {} for i in expected}
        self.done: set[int] = set()
        self.new: list[sh.CommitRecord] = []
        self.lease_uri, self.lease_token = lease_uri, lease_token
        self.lost: str | None = None
        self.restarted = _actor_restarted()
        if self.restarted:
            self.adopt_commits()

    def adopt_commits(self) -> None:
        """Take over the shards this run committed before the writer restarted."""
        for i, rec in sh.read_commits(self.out).items():
            if i in self.buffers and rec.run_id == self.run_id:
                del self.buffers[i]
                self.done.add(i)
                self.new.append(rec)

    def was_restarted(self) -> bool:
        return self.restarted

    def add(self, groups: dict[int, list[dict]]) -> int:
        for i, rows in groups.items():
            i = int(i)
            buf = self.buffers.get(i)
            if buf is None:
                continue  # committed already (or not this run's)
            for r in rows:
                buf.setdefault(str(r["id"]), r)
            self._maybe_commit(i)
        return len(self.new)

    def commit_ready(self) -> None:
        """Shards with no rows to wait for (only possible for zero-row shards)."""
        for i in list(self.buffers):
            self._maybe_commit(i)

    def _maybe_commit(self, i: int) -> None:
        buf = self.buffers.get(i)
        if buf is None or len(buf) < self.expected[i] or self.lost:
            return
        if self.lease_uri and not self._holds_lease():
            return
        rec = sh.commit_shard(self.out, self.fmt, i, list(self.buffers.pop(i).values()), self.run_id)
        self.done.add(i)
        self.new.append(rec)

    def _holds_lease(self) -> bool:
        try:
            held = json.loads(storage.read_bytes(self.lease_uri)).get("token")
        except (OSError, ValueError, AttributeError):
            held = None
        if held != self.lease_token:
            self.lost = "another run holds the output folder's lease now"
        return self.lost is None

    def drain(self) -> tuple[list[sh.CommitRecord], str | None]:
        new, self.new = self.new, []
        return new, self.lost

    def pending(self) -> dict[int, int]:
        """Shard -> rows still missing (for a run that ended with shards incomplete)."""
        return {i: self.expected[i] - len(b) for i, b in self.buffers.items()}


def _actor_restarted() -> bool:
    """Whether this process is a Ray actor that Ray restarted (False outside an actor)."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - no actor context: a first start
        return False


# ---------------------------------------------------------------------------------------------
# The prepare stage (CPU): read, template, tokenize, route outliers


def prepare_shard(spec, tokenizer, root: str, fmt: str, shard: int, pieces: list[Piece], text_col: str
                  ) -> tuple[list[dict], list[dict]]:
    """(error rows for the writer, engine rows ``{__rl_id, __rl_shard, tokenized_prompt}``)."""
    from runtime.batch.engine import ID, SHARD, prepare_prompts

    table = read_pieces(root, fmt, pieces)
    ids = [str(v) for v in table.column(spec.input.id_column).to_pylist()]
    errors, rows = [], []
    for row_id, prompt in zip(ids, prepare_prompts(spec, table.column(text_col).to_pylist(), tokenizer)):
        if isinstance(prompt, str):
            errors.append(error_row(row_id, prompt))
        else:
            rows.append({ID: row_id, SHARD: shard, "tokenized_prompt": prompt})
    return errors, rows


def pieces_json(pieces: list[Piece]) -> str:
    return json.dumps([[p.file, p.lo, p.hi] for p in pieces])


def pieces_from_json(text: str) -> list[Piece]:
    return [Piece(f, lo, hi) for f, lo, hi in json.loads(text)]


class Prepare:
    """Ray Data actor UDF: one shard in (``{shard, pieces}``), its engine rows out; its error
    rows go straight to the writer."""

    def __init__(self, spec, model_dir: str, adapter_dir: str | None, root: str, fmt: str, text_col: str, writer):
        from runtime.batch.engine import load_tokenizer, sampling_params

        self.spec, self.root, self.fmt, self.text_col, self.writer = spec, root, fmt, text_col, writer
        self.tokenizer = load_tokenizer(model_dir)
        self.params = sampling_params(spec)
        self.lora = {"model": adapter_dir} if adapter_dir else {}

    def __call__(self, batch):
        import ray
        from ray.llm._internal.batch.processor.base import Processor

        for shard, text in zip(batch["shard"], batch["pieces"]):
            errors, rows = prepare_shard(self.spec, self.tokenizer, self.root, self.fmt, int(shard),
                                         pieces_from_json(str(text)), self.text_col)
            if errors:
                ray.get(self.writer.add.remote({int(shard): errors}))
            if rows:
                yield pa.Table.from_pylist([{Processor.DATA_COLUMN: {**r, "sampling_params": dict(self.params),
                                                                     **self.lora}} for r in rows])


class Forward:
    """Ray Data actor UDF after the engine stage: engine rows, grouped by shard, to the writer."""

    def __init__(self, writer):
        self.writer = writer

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from runtime.batch.engine import SHARD, engine_output, engine_row

        groups: dict[int, list[dict]] = {}
        for row in engine_output(batch):
            groups.setdefault(int(row[SHARD]), []).append(engine_row(row))
        ray.get(self.writer.add.remote(groups))
        return pa.table({"rows": [batch.num_rows]})

