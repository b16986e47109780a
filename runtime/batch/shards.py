"""The shard commit protocol: deterministic shards, atomic shard files, commit records, manifest.

Layout of an output folder::

    OUTPUT/_plan.json                  what the folder is pinned to: per-shard id and prompt digests
                                       (input order), rows_per_shard, the generation config
    OUTPUT/_lease.json                 the one writer's lease while a run is on (runtime.batch.lease)
    OUTPUT/shard-00003.parquet         rows of shard 3: outputs and error rows, one per input id
    OUTPUT/_commits/shard-00003.json   commit record: row counts, id digest, file size + sha256
    OUTPUT/_manifest.json              the run's summary: every shard's status, row totals

A shard counts as done only when its commit record exists, and the record is written after the
shard file is in place (write to a temporary name, then rename). A crash between the two leaves
an uncommitted file that the next run overwrites under the same name, so no row is ever written
twice. Shards are slices of the input in its order (files sorted by name), so a rerun cuts the
same shards; the plan file refuses a rerun whose input (ids, their order, prompts), shard size or
generation config changed, and a rerun re-checks every committed file against its record.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from runtime import storage
from runtime.errors import RaylaneError

PLAN = "_plan.json"
MANIFEST = "_manifest.json"
COMMITS = "_commits"
FORMAT_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet"}
INPUT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------
# Input


def input_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    for suffix, name in INPUT_SUFFIXES.items():
        if path.rstrip("/").endswith(suffix):
            return name
    raise RaylaneError(
        f"cannot tell the format of input {path!r} from its name",
        hint="set input.format to jsonl, parquet or csv",
    )


def input_files(path: str, fmt: str | None) -> tuple[list[str], str]:
    """The input's files (sorted, so shards are the same on every run) and their format."""
    fs, p = storage.resolve(path)
    import pyarrow.fs as pafs

    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise RaylaneError(f"input {path!r} does not exist", hint="check input.path in the spec")
    if info.type == pafs.FileType.File:
        return [p], input_format(p, fmt)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))
    if fmt is None:
        fmts = {INPUT_SUFFIXES.get("." + f.rsplit(".", 1)[-1]) for f in files} - {None}
        if len(fmts) != 1:
            raise RaylaneError(f"input folder {path!r} has no single file format", hint="set input.format")
        fmt = fmts.pop()
    suffixes = [s for s, name in INPUT_SUFFIXES.items() if name == fmt]
    files = [f for f in files if f.endswith(tuple(suffixes))]
    if not files:
        raise RaylaneError(f"input folder {path!r} has no {fmt} files", hint="check input.path and input.format")
    return files, fmt


def selected_files(path: str, fmt: str | None, files: list[str] | None) -> tuple[list[str], str]:
    """``input_files``, or only ``files`` of them (an incremental run's), in the same order."""
    all_files, fmt = input_files(path, fmt)
    if files is not None:
        missing = sorted(set(files) - set(all_files))
        if missing:
            raise RaylaneError(f"input {path!r} no longer has {missing[0]}", hint="restore the file")
        all_files = [f for f in all_files if f in set(files)]
    return all_files, fmt


def read_input(path: str, fmt: str | None = None, files: list[str] | None = None) -> pa.Table:
    """The whole corpus (or only ``files`` of it) as one Arrow table, rows in a fixed order."""
    all_files, fmt = selected_files(path, fmt, files)
    fs, _ = storage.resolve(path)
    tables = [read_file(fs, f, fmt) for f in all_files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise RaylaneError(f"input {path!r} has no rows")
    return pa.concat_tables(tables, promote_options="permissive")


def read_file(fs, f: str, fmt: str) -> pa.Table:
    """One input file as an Arrow table (an empty jsonl file has no rows and no columns)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(f, filesystem=fs)
        with fs.open_input_stream(f) as stream:
            data = stream.read()
        if fmt == "jsonl":
            return pajson.read_json(io.BytesIO(data)) if data.strip() else pa.table({})
        return pacsv.read_csv(io.BytesIO(data))
    except pa.ArrowInvalid as e:
        raise RaylaneError(f"cannot read input file {f} as {fmt}: {e}", hint="check input.format") from None


def check_columns(table: pa.Table, id_column: str, text_column: str) -> list[str]:
    """Ids as strings, after checking the columns exist and ids are present and unique."""
    for field_path, col in (("input.id_column", id_column), ("input.prompt_column/messages_column", text_column)):
        if col not in table.column_names:
            raise RaylaneError(
                f"{field_path}: the input has no column {col!r} (columns: {', '.join(table.column_names)})",
                hint=f"set {field_path.split('/')[0]} to one of the input's columns",
            )
    ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
    missing = sum(1 for v in ids if v is None)
    if missing:
        raise RaylaneError(f"{missing} input rows have no {id_column!r}", hint="every row needs an id")
    seen: set[str] = set()
    dups = [v for v in ids if v in seen or seen.add(v)]
    if dups:
        raise RaylaneError(
            f"input ids are not unique: {len(dups)} duplicates, e.g. {dups[:3]}",
            hint=f"the completeness proof is keyed on {id_column!r}; deduplicate the input or pick another id column",
        )
    return ids


# ---------------------------------------------------------------------------------------------
# Shards and commits


def ids_digest(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_ranges(rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows_per_shard, rows)) for s in range(0, rows, rows_per_shard)]


PLAN_VERSION = 2


def shard_digests(ids: list[str], prompts: list[Any]) -> tuple[str, str]:
    """(ids in order, prompt content in order) digests of one shard's rows.

    Computed from the shard's rows alone, so whoever holds them (the driver today, a Ray Data
    worker later) computes the same value. Prompts are hashed as canonical JSON, so chat
    messages and plain text are both covered, and ``None`` differs from ``""``."""
    hi, hp = hashlib.sha256(), hashlib.sha256()
    for i, p in zip(ids, prompts, strict=True):
        hi.update(i.encode() + b"\n")
        hp.update(json.dumps(p, sort_keys=True, default=str, ensure_ascii=False).encode() + b"\n")
    return hi.hexdigest(), hp.hexdigest()


def generation_digest(generation: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(generation, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ShardPlan:
    """What an output folder is pinned to (``_plan.json``): the input (per-shard digests of the
    ids and the prompts, in input order), the sharding, and the generation config.

    ``version`` 1 plans (no per-shard digests, no generation) are upgraded by ``ensure_plan``
    when their own checks pass; see there."""

    input: str
    rows: int
    rows_per_shard: int
    shards: int
    ids_sha256: str  # the id *set* (order-insensitive): what verify compares the outputs with
    output_format: str
    id_column: str
    input_format: str
    version: int = PLAN_VERSION
    shard_ids_sha256: list[str] = field(default_factory=list)  # per shard, ids in input order
    shard_prompts_sha256: list[str] = field(default_factory=list)  # per shard, prompt content in order
    shard_idset_sha256: list[str] = field(default_factory=list)  # per shard, the id set (what its file holds)
    generation: dict[str, Any] = field(default_factory=dict)  # model/adapter versions, sampling, limits
    generation_sha256: str = ""
    upgraded_from: int | None = None
    input_files: list[str] | None = None  # incremental input: the files this folder covers (None = all)

    @classmethod
    def from_json(cls, data: bytes, uri: str = PLAN) -> ShardPlan:
        try:
            d = json.loads(data)
            version = int(d.get("version", 1))
        except (ValueError, TypeError, AttributeError) as e:
            raise RaylaneError(f"{uri}: not a readable shard plan ({e})",
                               hint="restore the file, or write to a new output.path") from None
        if version > PLAN_VERSION:
            raise RaylaneError(
                f"{uri}: plan version {version} was written by a newer raylane (this one reads up to {PLAN_VERSION})",
                hint="upgrade raylane, or write to a new output.path",
            )
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{**{k: v for k, v in d.items() if k in known}, "version": version})
        except TypeError as e:
            raise RaylaneError(f"{uri}: not a readable shard plan ({e})",
                               hint="restore the file, or write to a new output.path") from None

    def changes(self, new: ShardPlan) -> list[str]:
        """What differs between this (the folder's) plan and ``new`` (this run's), readably."""
        out = []
        for k in ("rows", "rows_per_shard", "output_format", "id_column"):
            if getattr(self, k) != getattr(new, k):
                out.append(f"{k} ({getattr(self, k)!r} -> {getattr(new, k)!r})")
        if out:
            return out  # other shards: per-shard comparisons would be noise
        if self.ids_sha256 != new.ids_sha256:
            out.append("input ids (other ids than the first run's)")
        elif self.shard_ids_sha256 != new.shard_ids_sha256:
            moved = _differing(self.shard_ids_sha256, new.shard_ids_sha256)
            out.append(f"input order (the same ids, in another order: shards {moved})")
        # Edited prompts: shards whose ids are the same, in the same order, but whose text is not.
        edited = [i for i, (a, b) in enumerate(zip(self.shard_ids_sha256, new.shard_ids_sha256))
                  if a == b and self.shard_prompts_sha256[i:i + 1] != new.shard_prompts_sha256[i:i + 1]]
        if edited:
            more = f" and {len(edited) - 5} more" if len(edited) > 5 else ""
            out.append(f"prompt content (shards {', '.join(map(str, edited[:5]))}{more})")
        if self.generation_sha256 != new.generation_sha256:
            keys = sorted(set(_flat(self.generation)) | set(_flat(new.generation)))
            old, cur = _flat(self.generation), _flat(new.generation)
            diff = [f"{k} ({old.get(k)!r} -> {cur.get(k)!r})" for k in keys if old.get(k) != cur.get(k)]
            out.append("generation config: " + (", ".join(diff) or "changed"))
        return out


def _differing(a: list[str], b: list[str], show: int = 5) -> str:
    idx = [i for i in range(max(len(a), len(b))) if (a[i:i + 1] or [None]) != (b[i:i + 1] or [None])]
    return ", ".join(map(str, idx[:show])) + (f" and {len(idx) - show} more" if len(idx) > show else "")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_plan(output: str) -> ShardPlan | None:
    uri = storage.join(output, PLAN)
    if not storage.exists(uri):
        return None
    return ShardPlan.from_json(storage.read_bytes(uri), uri)


def ensure_plan(output: str, plan: ShardPlan) -> ShardPlan:
    """Write the plan on a first run; on a rerun, refuse before any work if the input (ids, their
    order, the prompts), the sharding or the generation config changed.

    A version-1 plan (before per-shard digests) is accepted and upgraded when its own checks
    (row count, shard size, id set, format) pass: the folder keeps the guarantee it had, and
    from then on it is pinned to this run's order, prompts and generation config."""
    old = read_plan(output)
    uri = storage.join(output, PLAN)
    if old is not None and old.version < PLAN_VERSION:
        v1 = ("rows", "rows_per_shard", "ids_sha256", "output_format")
        diff = [k for k in v1 if getattr(old, k) != getattr(plan, k)]
        if not diff:
            from dataclasses import replace

            plan = replace(plan, upgraded_from=old.version)
            storage.write_bytes_atomic(uri, json.dumps(asdict(plan), indent=2).encode())
            return plan
        changed = [f"{k} ({getattr(old, k)!r} -> {getattr(plan, k)!r})" for k in diff]
    elif old is not None:
        changed = old.changes(plan)
        if not changed and plan.shard_idset_sha256 and not old.shard_idset_sha256:
            # A plan from before per-shard id sets: the same plan, with them added.
            from dataclasses import replace

            old = replace(old, shard_idset_sha256=plan.shard_idset_sha256)
            storage.write_bytes_atomic(uri, json.dumps(asdict(old), indent=2).encode())
        if not changed:
            return old
    else:
        storage.write_bytes_atomic(uri, json.dumps(asdict(plan), indent=2).encode())
        return plan
    raise RaylaneError(
        f"output {output!r} holds shards of a different run; changed since its first run: {'; '.join(changed)}",
        hint="write to a new output.path (or delete this folder to start over): a rerun into a folder "
        "must use the same input, in the same order, the same rows_per_shard and the same generation "
        "settings, or old and new shards would mix",
    )


@dataclass
class CommitRecord:
    shard: int
    file: str
    rows: int
    rows_out: int
    rows_error: int
    ids_sha256: str
    file_bytes: int
    file_sha256: str
    output_tokens: int
    run_id: str
    committed_at: float


def encode_rows(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf)
    return buf.getvalue()


def decode_rows(data: bytes, fmt: str) -> list[dict[str, Any]]:
    """Rows of a shard file; raises ValueError when it is truncated or corrupt."""
    if fmt == "jsonl":
        text = data.decode()
        if text and not text.endswith("\n"):
            raise ValueError("last line is cut off")
        try:
            return [json.loads(line) for line in text.splitlines() if line]
        except json.JSONDecodeError as e:
            raise ValueError(f"bad JSON line: {e}") from None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data)).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"not a readable parquet file: {e}") from None


OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("output", pa.string()),
        ("error", pa.string()),
        ("num_input_tokens", pa.int64()),
        ("num_output_tokens", pa.int64()),
    ]
)


def commit_shard(output: str, fmt: str, index: int, rows: list[dict[str, Any]], run_id: str) -> CommitRecord:
    """Write a shard's file atomically, then its commit record (the commit point)."""
    name = shard_name(index) + FORMAT_SUFFIX[fmt]
    data = encode_rows(sorted(rows, key=lambda r: r["id"]), fmt)
    storage.write_bytes_atomic(storage.join(output, name), data)
    errors = sum(1 for r in rows if r.get("error"))
    record = CommitRecord(
        shard=index,
        file=name,
        rows=len(rows),
        rows_out=len(rows) - errors,
        rows_error=errors,
        ids_sha256=ids_digest(r["id"] for r in rows),
        file_bytes=len(data),
        file_sha256=hashlib.sha256(data).hexdigest(),
        output_tokens=sum(int(r.get("num_output_tokens") or 0) for r in rows),
        run_id=run_id,
        committed_at=time.time(),
    )
    storage.write_bytes_atomic(commit_uri(output, index), json.dumps(asdict(record), indent=2).encode())
    return record


def commit_uri(output: str, index: int) -> str:
    return storage.join(output, COMMITS, shard_name(index) + ".json")


def read_commits(output: str, problems: list[str] | None = None,
                 shards: int | None = None) -> dict[int, CommitRecord]:
    """Commit records by shard. An unreadable record, or a stray one (its shard outside the plan's
    ``shards``, or its name not its shard), is left out and described in ``problems``: the
    shard then counts as not committed, so a rerun runs it again."""
    fs, _ = storage.resolve(output)
    records: dict[int, CommitRecord] = {}
    problems = problems if problems is not None else []
    for path in storage.list_files(storage.join(output, COMMITS), suffix=".json"):
        name = path.rsplit("/", 1)[-1]
        try:
            with fs.open_input_stream(path) as f:
                rec = CommitRecord(**json.loads(f.read()))
            if not isinstance(rec.shard, int) or not isinstance(rec.file, str):
                raise TypeError("shard or file has the wrong type")
        except (ValueError, TypeError, OSError) as e:
            problems.append(f"{COMMITS}/{name}: unreadable commit record ({type(e).__name__}: {str(e)[:120]})")
            continue
        if name != shard_name(rec.shard) + ".json":
            problems.append(f"{COMMITS}/{name}: stray commit record (it names shard {rec.shard})")
            continue
        if shards is not None and not 0 <= rec.shard < shards:
            problems.append(f"{COMMITS}/{name}: stray commit record, outside the plan's {shards} shards")
            continue
        records[rec.shard] = rec
    return records


def shard_file_problem(output: str, rec: CommitRecord) -> tuple[str | None, bytes | None]:
    """(why the committed file is not the one committed, or None; its bytes when present)."""
    uri = storage.join(output, rec.file)
    if not storage.exists(uri):
        return f"{rec.file}: committed but the file is missing", None
    data = storage.read_bytes(uri)
    if len(data) != rec.file_bytes or hashlib.sha256(data).hexdigest() != rec.file_sha256:
        return (f"{rec.file}: {len(data)} bytes, committed {rec.file_bytes} "
                "(truncated or modified after commit)"), data
    return None, data


def uncommit(output: str, index: int) -> None:
    """Drop a shard's commit record, so the shard counts as pending (a damaged shard, re-run)."""
    fs, path = storage.resolve(commit_uri(output, index))
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Incremental input: which files earlier runs committed


def ingested_files(ledger: str) -> dict[str, dict[str, Any]]:
    """Input file -> its ledger entry (size, the output folder and run that committed it)."""
    fs, _ = storage.resolve(ledger)
    out: dict[str, dict[str, Any]] = {}
    for path in storage.list_files(ledger, suffix=".json"):
        if path.rsplit("/", 1)[-1].startswith("_"):
            continue  # the ledger's own lease
        try:
            with fs.open_input_stream(path) as f:
                entry = json.loads(f.read())
            out[entry["file"]] = entry
        except (ValueError, KeyError, TypeError, OSError):
            continue  # a torn entry: the file counts as new (its rows run again, into a new folder)
    return out


def record_ingested(ledger: str, files: list[str], output: str, run_id: str) -> None:
    """After a run's output verified: its input files are done for later runs."""
    for f in files:
        key = hashlib.sha256(f.encode()).hexdigest()[:24]
        entry = {"file": f, "output": output, "run_id": run_id, "at": time.time()}
        storage.write_bytes_atomic(storage.join(ledger, key + ".json"), json.dumps(entry, indent=2).encode())


# ---------------------------------------------------------------------------------------------
# Manifest and verification


def write_manifest(output: str, manifest: dict[str, Any]) -> str:
    uri = storage.join(output, MANIFEST)
    storage.write_bytes_atomic(uri, json.dumps(manifest, indent=2).encode())
    return uri


@dataclass
class VerifyReport:
    """What ``raylane batch verify`` proves (``ok``) or the problems it found."""

    output: str
    ok: bool
    rows_in: int
    rows_out: int
    rows_error: int
    shards_total: int
    shards_committed: int
    problems: list[str] = field(default_factory=list)
    checked_against_input: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def verify_output(output: str, *, check_input: bool = True, max_problems: int = 50) -> VerifyReport:
    """Prove every input id appears exactly once across a batch output's shard files.

    >>> verify_output("/tmp/out").ok          # doctest: +SKIP

    Checks: every shard of the plan has a commit record and its file; each file is byte-for-byte
    the one committed (size and sha256) and decodes; its ids match the record's digest; no id
    appears twice across shards; and (when the input is readable) the ids are exactly the input's.
    """
    plan = read_plan(output)
    if plan is None:
        raise RaylaneError(
            f"{output!r} is not a batch output folder (no {PLAN})",
            hint="give the output.path of a BatchInference spec that has run",
        )
    problems: list[str] = []
    commits = read_commits(output, problems, shards=plan.shards)
    seen: dict[str, int] = {}
    rows_out = rows_error = 0
    fmt = plan.output_format
    for index in range(plan.shards):
        rec = commits.get(index)
        if rec is None:
            problems.append(f"{shard_name(index)}: not committed (missing shard)")
            continue
        problem, data = shard_file_problem(output, rec)
        if problem:
            problems.append(problem)
        if data is None:
            continue
        try:
            rows = decode_rows(data, fmt)
        except ValueError as e:
            problems.append(f"{rec.file}: unreadable ({e})")
            continue
        ids = [str(r.get("id")) for r in rows]
        if len(rows) != rec.rows or ids_digest(ids) != rec.ids_sha256:
            problems.append(f"{rec.file}: {len(rows)} rows, committed {rec.rows} (ids differ from the commit record)")
        for i in ids:
            if i in seen:
                problems.append(f"id {i!r} appears twice ({shard_name(seen[i])} and {shard_name(index)})")
            seen[i] = index
        errs = sum(1 for r in rows if r.get("error"))
        rows_error += errs
        rows_out += len(rows) - errs
    if len(seen) != plan.rows:
        problems.append(f"{len(seen)} distinct ids in the outputs, the input has {plan.rows}")
    if ids_digest(seen) != plan.ids_sha256 and len(seen) == plan.rows:
        problems.append("the output ids are not the input ids")
    checked = False
    if check_input and storage.exists(plan.input):
        # The plan's digest already ties outputs to the input as it was; re-reading it also
        # catches an input that changed since the run.
        try:
            table = read_input(plan.input, plan.input_format, files=plan.input_files)
        except RaylaneError:
            table = None
        if table is not None and plan.id_column in table.column_names:
            input_ids = [str(v) for v in table.column(plan.id_column).to_pylist()]
            missing = set(input_ids) - set(seen)
            unknown = set(seen) - set(input_ids)
            if missing:
                problems.append(f"{len(missing)} input ids have no output row, e.g. {sorted(missing)[:3]}")
            if unknown:
                problems.append(f"{len(unknown)} output ids are not in the input, e.g. {sorted(unknown)[:3]}")
            checked = True
    if len(problems) > max_problems:
        problems = problems[:max_problems] + [f"... and {len(problems) - max_problems} more"]
    return VerifyReport(
        output=output,
        ok=not problems,
        rows_in=plan.rows,
        rows_out=rows_out,
        rows_error=rows_error,
        shards_total=plan.shards,
        shards_committed=len(commits),
        problems=problems,
        checked_against_input=checked,
    )
