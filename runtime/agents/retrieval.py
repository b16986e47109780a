"""Retrieval: a document index built by a Ray Data job (chunk, embed, write) and its query tool.

>>> from runtime.agents.retrieval import build_index, retrieve
>>> info = build_index("sample", "/tmp/index")                           # doctest: +SKIP
>>> retrieve(query="What does Ray Serve do?", _index="/tmp/index")       # doctest: +SKIP
{'query': ..., 'hits': [{'id': 'serve#0', 'score': 0.41, 'text': ...}, ...]}

Embeddings are deterministic hashed bag-of-words + character 3-gram vectors (numpy, no model
download): this machine and air-gapped clusters have no model hub. They match on shared words,
not meaning; swap ``embed_texts`` for a real encoder where one is available. An index is a
folder of parquet files plus ``manifest.json``, written last, so a half-built index is never read.
"""

from __future__ import annotations

import json
import re
import time
import uuid
import zlib
from functools import lru_cache
from typing import Any

from runtime import storage
from runtime.errors import RaylaneError

RETRIEVE_PARAMETERS = {
    "type": "object",
    "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 80,
                             "description": "what to search for"}},
    "required": ["query"],
    "additionalProperties": False,
}

SAMPLE_DOCS = [
    ("ray-core", "Ray is a framework for scaling Python: tasks run functions remotely and actors keep "
     "state in a worker process. The object store shares data between them."),
    ("ray-data", "Ray Data streams datasets through map_batches transforms across a cluster; it reads "
     "parquet, json and csv files and writes results back to storage."),
    ("ray-train", "Ray Train runs distributed training on a gang of workers placed by a placement group; "
     "checkpoints are reported to storage so a job can resume after a failure."),
    ("ray-serve", "Ray Serve deploys online inference applications; deployments scale replicas with "
     "autoscaling and an HTTP proxy routes requests to them."),
    ("vllm", "vLLM is an inference engine with paged attention and continuous batching. Structured "
     "outputs constrain generation to a JSON schema."),
    ("kuberay", "KubeRay runs Ray on Kubernetes with RayCluster, RayJob and RayService resources; a "
     "RayService upgrades a Serve application without downtime."),
    ("raylane-agents", "raylane agents run sessions on Ray actors: each step calls the model, parses a "
     "tool call, runs the tool as a Ray task with a timeout, and saves the session after the step."),
    ("budgets", "An agent session ends when a budget is spent: max steps, max tokens, max wall time or "
     "max tool failures. The reason is recorded in the session."),
]

_WORD = re.compile(r"[a-z0-9]+")


def embed_texts(texts: list[str], dim: int = 256):
    """L2-normalised hashed word + char-3-gram vectors, shape (len(texts), dim), float32."""
    import numpy as np

    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        feats = words + [f"#{w[i:i + 3]}" for w in words for i in range(max(1, len(w) - 2))]
        for f in feats:
            h = zlib.crc32(f.encode())
            out[row, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
        n = float(np.linalg.norm(out[row]))
        if n:
            out[row] /= n
    return out


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    text = " ".join(str(text).split())
    if len(text) <= size:
        return [text] if text else []
    step = size - overlap
    return [text[i:i + size] for i in range(0, max(1, len(text) - overlap), step)]


def write_sample_corpus(path: str) -> str:
    """The built-in sample corpus as jsonl (what ``corpus: sample`` indexes)."""
    lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in SAMPLE_DOCS)
    storage.write_bytes_atomic(path, lines.encode())
    return path


def _read_corpus(corpus: str):
    import ray.data

    fs, path = storage.resolve(corpus)
    kwargs = {"filesystem": fs} if storage.is_remote(corpus) else {}
    if not storage.exists(corpus):
        raise RaylaneError(f"retrieval.corpus {corpus!r} does not exist", hint="point at a .jsonl or .parquet file/folder, or use 'sample'")
    lower = corpus.lower()
    if lower.endswith((".jsonl", ".json")):
        return ray.data.read_json(path, **kwargs)
    if lower.endswith(".parquet"):
        return ray.data.read_parquet(path, **kwargs)
    files = storage.list_files(corpus)
    if any(f.endswith(".parquet") for f in files):
        return ray.data.read_parquet(path, **kwargs)
    if any(f.endswith((".jsonl", ".json")) for f in files):
        return ray.data.read_json(path, **kwargs)
    raise RaylaneError(f"retrieval.corpus {corpus!r}: no .jsonl or .parquet files", hint="index jsonl or parquet documents with a text column")


def build_index(
    corpus: str,
    index_uri: str,
    *,
    text_column: str = "text",
    chunk_chars: int = 400,
    chunk_overlap: int = 50,
    dim: int = 256,
    work_dir: str | None = None,
) -> dict[str, Any]:
    """Chunk, embed and write ``corpus`` with Ray Data (Ray must be initialised); returns the manifest."""
    t0 = time.perf_counter()
    if corpus == "sample":
        corpus = write_sample_corpus(storage.join(work_dir or index_uri, "sample-corpus.jsonl"))
    ds = _read_corpus(corpus)
    columns = ds.columns() or []
    if text_column not in columns:
        raise RaylaneError(
            f"retrieval.text_column {text_column!r} is not a column of {corpus} (columns: {', '.join(columns)})",
            hint=f"set retrieval.text_column to one of: {', '.join(columns)}",
        )

    def chunk(row: dict) -> list[dict]:
        doc_id = str(row.get("id", zlib.crc32(str(row[text_column]).encode())))
        return [{"id": f"{doc_id}#{i}", "doc_id": doc_id, "text": c}
                for i, c in enumerate(chunk_text(row[text_column], chunk_chars, chunk_overlap))]

    def embed(batch: dict) -> dict:
        vecs = embed_texts([str(t) for t in batch["text"]], dim)
        return {"id": batch["id"], "doc_id": batch["doc_id"], "text": batch["text"], "vector": list(vecs)}

    version = f"v-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    data_uri = storage.join(index_uri, version)
    fs, data_path = storage.resolve(data_uri)
    chunks = ds.flat_map(chunk).map_batches(embed, batch_format="numpy", batch_size=256)
    chunks.write_parquet(data_path, filesystem=fs)
    n = _read_table(data_uri).num_rows if storage.exists(data_uri) else 0
    manifest = {"data": version, "dim": dim, "chunks": n, "corpus": corpus, "embedding": "hashed-ngram-v1",
                "built_s": round(time.perf_counter() - t0, 2)}
    storage.write_bytes_atomic(storage.join(index_uri, "manifest.json"), json.dumps(manifest).encode())
    return manifest


def read_manifest(index_uri: str) -> dict[str, Any] | None:
    uri = storage.join(index_uri, "manifest.json")
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def _read_table(data_uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.resolve(data_uri)
    return pq.read_table(path, filesystem=fs)


@lru_cache(maxsize=8)
def _load(index_uri: str, version: str):
    import numpy as np

    table = _read_table(storage.join(index_uri, version))
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist()
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32).reshape(len(ids), -1)
    return ids, texts, vectors


def retrieve(query: str, *, _index: str, _top_k: int = 3, _min_score: float = 0.05, _dim: int = 256) -> dict:
    """Best-matching chunks for ``query``; an empty ``hits`` list means nothing matched."""
    manifest = read_manifest(_index)
    if manifest is None:
        raise RuntimeError(f"no index at {_index} (build it first: the agent builds it at startup)")
    ids, texts, vectors = _load(_index, manifest["data"])
    if not ids:
        return {"query": query, "hits": []}
    scores = vectors @ embed_texts([query], manifest.get("dim", _dim))[0]
    order = scores.argsort()[::-1][:_top_k]
    hits = [{"id": ids[i], "score": round(float(scores[i]), 4), "text": texts[i]} for i in order if scores[i] >= _min_score]
    return {"query": query, "hits": hits}
