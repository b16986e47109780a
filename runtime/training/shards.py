"""Token shards: a dataset tokenized and packed once (Ray Data), memory-mapped by every worker.

>>> from runtime.training.shards import ensure_shards
>>> shards = ensure_shards(spec.data, tokenizer_dir, root)          # doctest: +SKIP (needs Ray)
>>> shards.train[np.array([3, 70_000])].shape                        # doctest: +SKIP
(2, 128)

Layout under the storage root, one folder per cache key::

    <root>/datasets/<key>/index.json            written last: a folder without it is unfinished
    <root>/datasets/<key>/train-00000.npy ...   [<= per_shard, max_seq_len] uint16 (uint32 past 65535 ids)
    <root>/datasets/<key>/eval-00000.npy ...
    <root>/datasets/<key>/eval-texts.jsonl      the held-out documents (for eval.metric)

The key hashes the data files (content for files up to 8 MiB, otherwise path + size + mtime: a
rewritten file is a new dataset), the tokenizer's files, ``max_seq_len``, the columns and the
eval split, so a later run or a resume of the same spec reads the shards without tokenizing.

Packing is what ``runtime.training.data.pack`` does to the whole corpus: documents in file order,
each followed by EOS, cut into ``max_seq_len`` sequences, the tail dropped. Ray Data tokenizes in
its workers (``map_batches``); the driver only streams the token ids, in order, into fixed-size
shards (its memory is one shard, not the corpus). A worker opens the shards with ``np.load(...,
mmap_mode="r")`` and reads only the rows of its batch; remote shards (s3://) are copied once per
node into a local cache first.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from runtime import storage
from runtime.errors import RaylaneError

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 22  # tokens per shard (8 MiB as uint16): a shard is the unit a worker maps or copies
CONTENT_HASH_MAX_BYTES = 8 << 20  # data files up to this size are keyed by content, larger by size + mtime
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")


# -- the cache key ------------------------------------------------------------------------------
def _hash_file(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """The data files' identity (``DatasetSpec.path``): content for small files, path + size +
    mtime for large ones (reading a 50M-token corpus to hash it would cost more than the check)."""
    from runtime.training.data import data_files

    fs, _ = storage.resolve(data.path)
    h = hashlib.sha256()
    for f in data_files(data.path):
        info = fs.get_file_info(f)
        if info.size is not None and info.size <= CONTENT_HASH_MAX_BYTES:
            part = f"{os.path.basename(f)}:{_hash_file(fs, f)}"
        else:
            part = f"{f}:{info.size}:{info.mtime_ns if info.mtime_ns is not None else info.mtime}"
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def tokenizer_identity(tokenizer_dir: str) -> str:
    """The tokenizer's files (vocabulary, merges, special tokens, chat template) hashed; a hub name
    or a folder without them is its name."""
    h = hashlib.sha256()
    found = False
    if os.path.isdir(tokenizer_dir):
        for name in TOKENIZER_FILES:
            p = os.path.join(tokenizer_dir, name)
            if os.path.isfile(p):
                found = True
                with open(p, "rb") as f:
                    h.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    if not found:
        h.update(tokenizer_dir.encode())
    return h.hexdigest()[:16]


def cache_key(data, tokenizer_dir: str, *, fingerprint: str | None = None) -> str:
    """The shard folder's name: what makes two runs' token sequences identical."""
    parts = {
        "v": FORMAT_VERSION, "data": fingerprint or data_fingerprint(data), "format": data.format,
        "text_column": data.text_column, "messages_column": data.messages_column,
        "eval_fraction": data.eval_fraction, "max_seq_len": data.max_seq_len,
        "tokenizer": tokenizer_identity(tokenizer_dir), "shard_tokens": SHARD_TOKENS,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# -- reading ------------------------------------------------------------------------------------
@dataclass
class TokenShards:
    """One split's packed sequences, ``[len(self), seq_len]``, as fixed-size shards on storage.

    Pickles as its location only (Ray ships it to workers and the eval task); each process maps
    the shards it touches lazily. ``shards[idx]`` with an index array (or a slice) returns those
    rows as an int64 ndarray; nothing else is read."""

    directory: str  # the cache folder (a URI)
    split: str
    sequences: int
    seq_len: int
    per_shard: int
    shards: list[str]
    dtype: str
    _maps: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.sequences

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _maps={})

    def _shard(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            m = self._maps[i] = np.load(_local_path(storage.join(self.directory, self.shards[i])), mmap_mode="r")
        return m

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(self.sequences)[idx]
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 1:
            raise IndexError("TokenShards takes a 1-d index array or a slice")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.sequences):
            raise IndexError(f"sequence index out of range 0..{self.sequences - 1}")
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        shard, row = np.divmod(idx, self.per_shard)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._shard(int(s))[row[sel]]
        return out


def _local_path(uri: str) -> str:
    """A local path to the shard: itself, or a per-node copy of a remote one (made once)."""
    if not storage.is_remote(uri):
        return storage.resolve(uri)[1]
    import pyarrow.fs as pafs

    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "raylane-shards", f"{key}-{os.path.basename(uri)}")
    if not os.path.isfile(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs, path = storage.resolve(uri)
        tmp = f"{local}.{os.getpid()}.tmp"
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local)
    return local


@dataclass
class Shards:
    """A dataset's cache folder: both splits and what building it cost."""

    key: str
    directory: str
    train: TokenShards
    eval: TokenShards
    built: bool  # False: an earlier run's shards were reused, nothing was tokenized
    seconds: float
    documents: int
    tokens: int

    def eval_texts(self) -> list[str]:
        raw = storage.read_bytes(storage.join(self.directory, "eval-texts.jsonl")).decode()
        return [json.loads(line) for line in raw.splitlines() if line]

    def summary(self) -> dict:
        return {"key": self.key, "directory": self.directory, "built": self.built, "seconds": round(self.seconds, 2),
                "documents": self.documents, "tokens": self.tokens, "train_sequences": len(self.train),
                "eval_sequences": len(self.eval)}


def open_shards(directory: str, *, built: bool = False, seconds: float = 0.0) -> Shards | None:
    """The shards in ``directory``, or None when it has no (finished) index."""
    index_uri = storage.join(directory, "index.json")
    if not storage.exists(index_uri):
        return None
    index = json.loads(storage.read_bytes(index_uri))
    if index.get("version") != FORMAT_VERSION:
        return None
    splits = {s: TokenShards(directory, s, seq_len=index["seq_len"], per_shard=index["per_shard"],
                             dtype=index["dtype"], **index["splits"][s]) for s in ("train", "eval")}
    return Shards(index["key"], directory, splits["train"], splits["eval"], built, seconds,
                  index["documents"], index["tokens"])


# -- building -----------------------------------------------------------------------------------
class _SplitWriter:
    """Appends one split's token stream and writes full shards as they fill; holds at most one
    shard's tokens (plus one document)."""

    def __init__(self, directory: str, split: str, seq_len: int, per_shard: int, dtype):
        self.directory, self.split, self.seq_len, self.per_shard, self.dtype = directory, split, seq_len, per_shard, dtype
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.sequences = 0
        self.shards: list[str] = []

    def add(self, ids: np.ndarray) -> None:
        self.parts.append(ids)
        self.buffered += len(ids)
        while self.buffered >= self.per_shard * self.seq_len:
            self._flush(self.per_shard)

    def _flush(self, rows: int) -> None:
        if not self.parts:
            return
        stream = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
        n = rows * self.seq_len
        if rows:
            self._write(stream[:n].astype(self.dtype).reshape(rows, self.seq_len))
        rest = stream[n:]
        self.parts, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _write(self, block: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.npy"
        fs, path = storage.resolve(storage.join(self.directory, name))
        with fs.open_output_stream(path) as f:
            np.lib.format.write_array(f, block, allow_pickle=False)
        self.shards.append(name)
        self.sequences += len(block)

    def close(self) -> dict:
        self._flush(self.buffered // self.seq_len)  # the tail shorter than a sequence is dropped
        return {"sequences": self.sequences, "shards": self.shards}


def write_shards(batches, directory: str, *, key: str, seq_len: int, vocab_size: int, eval_fraction: float) -> dict:
    """Write the shards of the tokenized ``batches`` (pyarrow tables of ``TokenizeBatch``, in
    document order) and, last, ``index.json``. Returns the index."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    per_shard = max(1, SHARD_TOKENS // seq_len)
    storage.makedirs(directory)
    train = _SplitWriter(directory, "train", seq_len, per_shard, dtype)
    held = _SplitWriter(directory, "eval", seq_len, per_shard, dtype)
    texts: list[str] = []
    documents = tokens = 0
    # The last training document is held back: a corpus with no held-out document gives it to eval
    # (what runtime.training.data.split does), so a tiny dataset still gets evaluated.
    pending: tuple[np.ndarray, str] | None = None
    for batch in (b for table in batches for b in table.to_batches()):
        ids_col, text_col = batch.column("ids"), batch.column("text")
        flags = batch.column("eval").to_pylist()
        offsets = ids_col.offsets.to_numpy()
        values = ids_col.values.to_numpy(zero_copy_only=False)
        for i, is_eval in enumerate(flags):
            ids = values[offsets[i]:offsets[i + 1]]
            documents += 1
            tokens += len(ids)
            if is_eval:
                held.add(ids)
                texts.append(text_col[i].as_py())
                continue
            if pending is not None:
                train.add(pending[0])
            pending = (ids.copy(), text_col[i].as_py())
    if documents == 0:
        raise RaylaneError(f"training data has no rows (nothing to write to {directory})")
    if pending is not None:
        if eval_fraction > 0 and not texts and documents > 1:
            held.add(pending[0])
            texts.append(pending[1])
        else:
            train.add(pending[0])
    storage.write_bytes_atomic(storage.join(directory, "eval-texts.jsonl"),
                               "".join(json.dumps(t) + "\n" for t in texts).encode())
    index = {"version": FORMAT_VERSION, "key": key, "seq_len": seq_len, "per_shard": per_shard,
             "dtype": np.dtype(dtype).name, "documents": documents, "tokens": tokens,
             "splits": {"train": train.close(), "eval": held.close()}, "time": time.time()}
    storage.write_bytes_atomic(storage.join(directory, "index.json"), json.dumps(index, indent=1).encode())
    return index


class TokenizeBatch:
    """Ray Data ``map_batches`` UDF (runs in Ray Data's workers): rows (a jsonl line, or a parquet
    row) to one row per document: its token ids followed by EOS, its split, and its text when the
    driver may need it (held-out documents, and the last training document of the batch)."""

    def __init__(self, tokenizer_dir: str, column: str, chat: bool, eval_fraction: float, jsonl: bool, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.column, self.chat, self.eval_fraction, self.jsonl, self.path = column, chat, eval_fraction, jsonl, path

    def __call__(self, batch):
        import pyarrow as pa

        from runtime.training.data import is_eval

        if self.jsonl:
            rows = [json.loads(line) for line in batch.column("text").to_pylist() if line.strip()]
            if rows and self.column not in rows[0]:
                raise RaylaneError(f"training data {self.path!r} has no column {self.column!r} "
                                   f"(columns: {', '.join(rows[0])})", hint="set data.text_column or data.messages_column")
            values = [r[self.column] for r in rows]
        else:
            values = batch.column(self.column).to_pylist()
        if self.chat:
            docs = [self.tok.apply_chat_template(v, tokenize=False) for v in values]
        else:
            docs = [str(v) for v in values]
        eos = self.tok.eos_token_id
        ids = [self.tok(d, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []) for d in docs]
        flags = [is_eval(d, self.eval_fraction) for d in docs]
        last_train = max((i for i, f in enumerate(flags) if not f), default=-1)
        texts = [d if (f or i == last_train) else "" for i, (d, f) in enumerate(zip(docs, flags))]
        return pa.table({"ids": pa.array(ids, type=pa.list_(pa.uint32())), "eval": pa.array(flags, type=pa.bool_()),
                         "text": pa.array(texts, type=pa.string())})


def _dataset(data, tokenizer_dir: str, cpus: float):
    """A Ray Data dataset of ``TokenizeBatch`` rows over the data files, in file order."""
    import ray
    import ray.data

    from runtime.training.data import data_files, format_of

    files = data_files(data.path)
    fs, _ = storage.resolve(data.path)
    # Tokenizer actors scale with the cluster (each takes ``cpus``); the order of the output does not.
    max_actors = max(1, int(ray.cluster_resources().get("CPU", 1) / max(cpus, 0.01)) // 2)
    column = data.messages_column or data.text_column
    parts = []
    # One read per run of same-format files keeps the file order when a folder mixes formats.
    for f in files:
        fmt = format_of(f, data.format)
        if parts and parts[-1][0] == fmt:
            parts[-1][1].append(f)
        else:
            parts.append((fmt, [f]))
    datasets = []
    for fmt, group in parts:
        if fmt == "parquet":
            ds = ray.data.read_parquet(group, filesystem=fs, columns=[column], ray_remote_args={"num_cpus": cpus})
        else:
            ds = ray.data.read_text(group, filesystem=fs, ray_remote_args={"num_cpus": cpus})
        datasets.append(ds.map_batches(
            TokenizeBatch, fn_constructor_args=(tokenizer_dir, column, bool(data.messages_column), data.eval_fraction,
                                                fmt != "parquet", data.path),
            batch_format="pyarrow", batch_size=1024, num_cpus=cpus, concurrency=(1, max_actors)))
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])


def ensure_shards(data, tokenizer_dir: str, root: str, *, vocab_size: int, cpus: float = 0.5,
                  fingerprint: str | None = None) -> Shards:
    """The dataset's shards under ``<root>/datasets/<key>/``: reused when an earlier run built them,
    else tokenized and packed with Ray Data (needs a Ray connection) and written."""
    t0 = time.perf_counter()
    key = cache_key(data, tokenizer_dir, fingerprint=fingerprint)
    directory = storage.join(root, "datasets", key)
    found = open_shards(directory, seconds=time.perf_counter() - t0)
    if found is not None:
        return found
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the token stream in file order: the same shards every time
    try:
        ds = _dataset(data, tokenizer_dir, cpus)
        write_shards(ds.iter_batches(batch_format="pyarrow", batch_size=None), directory, key=key,
                     seq_len=data.max_seq_len, vocab_size=vocab_size, eval_fraction=data.eval_fraction)
    finally:
        ctx.execution_options.preserve_order = saved
    return open_shards(directory, built=True, seconds=time.perf_counter() - t0)
