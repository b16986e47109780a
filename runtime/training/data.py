"""Training data: read jsonl/parquet (local or s3://), tokenize, pack, split, and index by step.

Training runs read packed token shards (``runtime.training.shards``, built once with Ray Data);
``load_documents`` and ``pack`` serve small in-memory sets (drift checks) and the tests.

>>> from runtime.training.data import load_documents, pack
>>> docs = load_documents(spec.data)                                # doctest: +SKIP
>>> blocks = pack(tokenizer, docs, max_seq_len=128)                 # doctest: +SKIP

The data position is a pure function of the step: step ``s`` reads the same sequences before and
after a resume, which is what makes the step count exact and the loss curve continuous.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json

import numpy as np

from runtime import storage
from runtime.errors import RaylaneError


def format_of(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    raise RaylaneError(f"cannot tell the format of {path!r}", hint="set data.format: jsonl or parquet")


def data_files(path: str) -> list[str]:
    """The data files at ``path`` (a file, or every .jsonl/.json/.parquet file in a folder)."""
    import pyarrow.fs as pafs

    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise RaylaneError(f"training data {path!r} does not exist", hint="check data.path in the spec")
    if info.type == pafs.FileType.File:
        return [p]
    found = [f for f in storage.list_files(path) if f.endswith((".jsonl", ".json", ".parquet"))]
    if not found:
        raise RaylaneError(f"no .jsonl or .parquet files in {path!r}", hint="point data.path at a file or a folder of them")
    return found


def read_rows(data) -> list[dict]:
    """All rows of the dataset (``DatasetSpec``) as dicts."""
    import pyarrow as pa
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(data.path)
    rows: list[dict] = []
    for f in data_files(data.path):
        fmt = format_of(f, data.format)
        if fmt == "parquet":
            rows += pq.read_table(f, filesystem=fs).to_pylist()
        else:
            with fs.open_input_stream(f) as stream:
                raw = stream.read()
            if not raw.strip():
                continue
            try:
                rows += pajson.read_json(io.BytesIO(raw)).to_pylist()
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                # pyarrow rejects ragged nested rows (chat messages); the json module does not
                rows += [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return rows


def load_documents(data, tokenizer=None) -> list[str]:
    """One string per row: the text column, or chat messages rendered with the chat template."""
    rows = read_rows(data)
    if not rows:
        raise RaylaneError(f"training data {data.path!r} has no rows")
    column = data.messages_column or data.text_column
    if column not in rows[0]:
        raise RaylaneError(
            f"training data {data.path!r} has no column {column!r} (columns: {', '.join(rows[0])})",
            hint="set data.text_column or data.messages_column",
        )
    if data.messages_column:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise RaylaneError("data.messages_column needs a tokenizer with a chat template")
        return [tokenizer.apply_chat_template(r[column], tokenize=False) for r in rows]
    return [str(r[column]) for r in rows]


def check_columns(data, tokenizer=None) -> None:
    """The first row of the first data file has the spec's column (and chat data has a template):
    checked in the driver, before any worker starts."""
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(data.path)
    first = data_files(data.path)[0]
    column = data.messages_column or data.text_column
    if format_of(first, data.format) == "parquet":
        with fs.open_input_file(first) as f:
            columns = pq.read_schema(f).names
    else:
        columns = None
        with fs.open_input_stream(first) as f:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                if line.strip():
                    row = json.loads(line)
                    columns = list(row) if isinstance(row, dict) else []
                    break
        if columns is None:
            raise RaylaneError(f"training data {data.path!r} has no rows", hint="check data.path in the spec")
    if column not in columns:
        raise RaylaneError(f"training data {data.path!r} has no column {column!r} (columns: {', '.join(columns)})",
                           hint="set data.text_column or data.messages_column")
    if data.messages_column and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise RaylaneError("data.messages_column needs a tokenizer with a chat template")


def is_eval(doc: str, eval_fraction: float) -> bool:
    """A document's split depends only on its text, so it never moves as the data grows."""
    h = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big")
    return (h % 10_000) < eval_fraction * 10_000


def split(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    train = [d for d in docs if not is_eval(d, eval_fraction)]
    held = [d for d in docs if is_eval(d, eval_fraction)]
    if eval_fraction > 0 and not held and len(docs) > 1:
        held, train = train[-1:], train[:-1]  # tiny datasets still get a held-out document
    return train, held


def fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]


def pack(tokenizer, docs: list[str], max_seq_len: int) -> np.ndarray:
    """Tokenize, join with EOS and cut into ``[n, max_seq_len]`` int32 blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    n = len(ids) // max_seq_len
    return np.asarray(ids[: n * max_seq_len], dtype=np.int32).reshape(n, max_seq_len)


def steps_per_epoch(num_blocks: int, batch_size: int, world_size: int) -> int:
    return num_blocks // (batch_size * world_size)


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    """The order of the sequences in ``epoch``: a permutation of their indices, computed from the
    seed without the corpus. O(sequences) int64: 100k entries (800 KB) for 50M tokens of 512."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    perm.flags.writeable = False
    return perm


def batch_indices(step: int, *, num_blocks: int, batch_size: int, world_size: int, rank: int, seed: int) -> np.ndarray:
    """Sequence indices rank ``rank`` trains on at ``step`` (0-based): epoch ``step // steps_per_epoch``
    in its own permutation, ranks taking consecutive slices of ``batch_size`` from position
    ``(step % steps_per_epoch) * world_size * batch_size``. A pure function of the step, so a resume
    at step s reads what the uninterrupted run read; the last partial batch of an epoch is skipped."""
    spe = steps_per_epoch(num_blocks, batch_size, world_size)
    epoch, k = divmod(step, spe)
    perm = epoch_permutation(seed, epoch, num_blocks)
    start = (k * world_size + rank) * batch_size
    return perm[start:start + batch_size]


def data_position(step: int, num_blocks: int, batch_size: int, world_size: int) -> dict:
    epoch, k = divmod(step, steps_per_epoch(num_blocks, batch_size, world_size))
    return {"epoch": epoch, "batch_in_epoch": k}


_PRODUCTS = ["router", "laptop", "camera", "headset", "monitor", "keyboard", "printer", "phone"]
_ANSWERS = {
    "does not turn on": "hold the power button for ten seconds, then plug it in again",
    "arrived late": "we are sorry; a shipping credit is on your account",
    "is missing a cable": "a replacement cable ships today at no cost",
    "makes a noise": "please send a short video so we can check it",
    "needs a refund": "the refund is approved and arrives in five days",
    "shows an error": "update the firmware from the settings page and restart",
}


def write_demo_data(text_path, chat_path=None, *, rows: int = 240, chat_rows: int = 120, seed: int = 4) -> None:
    """The support-ticket corpus of ``examples/data`` (text, and chat messages), the same bytes every time."""
    import random
    from pathlib import Path

    rng = random.Random(seed)
    issues = list(_ANSWERS)
    with open(Path(text_path), "w") as f:
        for i in range(rows):
            p, q = rng.choice(_PRODUCTS), rng.choice(issues)
            f.write(json.dumps({"text": f"Ticket {i}: my {p} {q}. Support: for the {p}, {_ANSWERS[q]}."}) + "\n")
    if chat_path:
        with open(Path(chat_path), "w") as f:
            for _ in range(chat_rows):
                p, q = rng.choice(_PRODUCTS), rng.choice(issues)
                f.write(json.dumps({"messages": [{"role": "user", "content": f"My {p} {q}."},
                                                 {"role": "assistant", "content": f"For the {p}, {_ANSWERS[q]}."}]}) + "\n")
