"""Unit tier (no Ray): token shards (``runtime.training.shards``) and the per-step index math.

The Ray Data pipeline is exercised by the slow training tests; here its per-batch UDF and the
driver's shard writer run in-process, so the packed sequences can be compared with the in-memory
packing that training used before shards, row for row.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import RaylaneError
from runtime.specs.training import DatasetSpec
from runtime.training import shards as sh
from runtime.training.data import batch_indices, load_documents, pack, split, steps_per_epoch
from tests.conftest import EXAMPLES


def _build(data: DatasetSpec, tokenizer_dir: str, directory: Path, lines_per_batch: int = 50) -> sh.Shards:
    """What ensure_shards does, without Ray: TokenizeBatch over batches of rows, then write_shards."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    udf = sh.TokenizeBatch(tokenizer_dir, data.messages_column or data.text_column, bool(data.messages_column),
                           data.eval_fraction, True, data.path)
    lines = Path(data.path).read_text().splitlines()
    batches = (udf(pa.table({"text": lines[i:i + lines_per_batch]})) for i in range(0, len(lines), lines_per_batch))
    key = sh.cache_key(data, tokenizer_dir)
    sh.write_shards(batches, str(directory), key=key, seq_len=data.max_seq_len,
                    vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), eval_fraction=data.eval_fraction)
    return sh.open_shards(str(directory))


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(sh, "SHARD_TOKENS", 1000)  # several shards even for the example corpus


@pytest.mark.parametrize("name,column", [("train.jsonl", None), ("chat.jsonl", "messages")])
def test_shards_hold_the_same_sequences_as_packing_in_memory(tmp_path, tiny_model, small_shards, name, column):
    from transformers import AutoTokenizer

    data = DatasetSpec(path=str(EXAMPLES / "data" / name), messages_column=column, max_seq_len=32)
    s = _build(data, str(tiny_model), tmp_path / "shards")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train_docs, eval_docs = split(load_documents(data, tok), data.eval_fraction)
    want_train, want_eval = pack(tok, train_docs, 32), pack(tok, eval_docs, 32)
    assert len(s.train.shards) > 2 and s.train.per_shard == 1000 // 32
    assert len(s.train) == len(want_train) and len(s.eval) == len(want_eval)
    np.testing.assert_array_equal(s.train[np.arange(len(s.train))], want_train)
    np.testing.assert_array_equal(s.train[5:9], want_train[5:9])
    np.testing.assert_array_equal(s.eval[:], want_eval)
    assert s.eval_texts() == eval_docs
    assert s.train[np.array([0])].dtype == np.int64 and np.load(tmp_path / "shards" / "train-00000.npy").dtype == np.uint16
    with pytest.raises(IndexError, match="out of range"):
        s.train[np.array([len(s.train)])]


def test_a_corpus_without_held_out_documents_gives_its_last_one_to_eval(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 8}) + "\n" for i in range(6)))
    data = DatasetSpec(path=str(path), eval_fraction=0.0001, max_seq_len=16)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    train_docs, eval_docs = split(load_documents(data, tok), data.eval_fraction)
    assert len(eval_docs) == 1  # split's fallback, which the shard writer must reproduce
    s = _build(data, str(tiny_model), tmp_path / "shards", lines_per_batch=4)
    np.testing.assert_array_equal(s.train[:], pack(tok, train_docs, 16))
    np.testing.assert_array_equal(s.eval[:], pack(tok, eval_docs, 16))
    assert s.eval_texts() == eval_docs and s.documents == 6


def test_every_sequence_once_per_epoch_across_ranks_and_resume_reads_the_same_rows(tmp_path, tiny_model, small_shards):
    data = DatasetSpec(path=str(EXAMPLES / "data" / "train.jsonl"), max_seq_len=32)
    s = _build(data, str(tiny_model), tmp_path / "shards")
    n, bs, world, seed = len(s.train), 3, 2, 7
    spe = steps_per_epoch(n, bs, world)
    assert spe * bs * world <= n < (spe + 1) * bs * world

    def rows(step, rank):
        return s.train[batch_indices(step, num_blocks=n, batch_size=bs, world_size=world, rank=rank, seed=seed)]

    for epoch in range(2):
        idx = np.concatenate([batch_indices(epoch * spe + k, num_blocks=n, batch_size=bs, world_size=world, rank=r,
                                            seed=seed) for k in range(spe) for r in range(world)])
        assert len(set(idx.tolist())) == len(idx) == spe * bs * world  # no sequence twice in an epoch
    first = [batch_indices(k, num_blocks=n, batch_size=bs, world_size=world, rank=0, seed=seed) for k in range(2)]
    second = [batch_indices(spe + k, num_blocks=n, batch_size=bs, world_size=world, rank=0, seed=seed) for k in range(2)]
    assert not np.array_equal(first, second)  # a fresh order each epoch
    # A worker restarted at step s (a fresh process: a fresh, unpickled shard handle) reads what the
    # uninterrupted run read at s, on every rank, in the next epoch too.
    uninterrupted = [[rows(k, r) for r in range(world)] for k in range(spe + 3)]
    resumed = pickle.loads(pickle.dumps(s.train))
    for k in range(spe - 2, spe + 3):
        for r in range(world):
            got = resumed[batch_indices(k, num_blocks=n, batch_size=bs, world_size=world, rank=r, seed=seed)]
            np.testing.assert_array_equal(got, uninterrupted[k][r])


def test_a_shard_handle_travels_as_its_location(tmp_path, tiny_model, small_shards):
    data = DatasetSpec(path=str(EXAMPLES / "data" / "train.jsonl"), max_seq_len=32)
    s = _build(data, str(tiny_model), tmp_path / "shards")
    s.train[np.arange(len(s.train))]  # maps every shard
    assert s.train._maps and len(pickle.dumps(s.train)) < 4000 and not pickle.loads(pickle.dumps(s.train))._maps


def test_cache_key_follows_data_tokenizer_and_packing(tmp_path, tiny_model, monkeypatch):
    import shutil

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b c"}\n')
    data = DatasetSpec(path=str(path))
    key = sh.cache_key(data, str(tiny_model))
    assert sh.cache_key(DatasetSpec(path=str(path)), str(tiny_model)) == key
    path.write_text('{"text": "a b c"}\n')  # the same bytes again: a small file is keyed by content
    assert sh.cache_key(data, str(tiny_model)) == key
    for changed in (DatasetSpec(path=str(path), max_seq_len=64), DatasetSpec(path=str(path), eval_fraction=0.2),
                    DatasetSpec(path=str(path), text_column="body")):
        assert sh.cache_key(changed, str(tiny_model)) != key
    other_tok = tmp_path / "tok"
    shutil.copytree(tiny_model, other_tok)
    assert sh.cache_key(data, str(other_tok)) == key  # the same tokenizer files elsewhere
    cfg = json.loads((other_tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (other_tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert sh.cache_key(data, str(other_tok)) != key
    path.write_text('{"text": "a b d"}\n')
    assert sh.cache_key(data, str(tiny_model)) != key
    # Large files are keyed by size and mtime: touching one is a new dataset.
    monkeypatch.setattr(sh, "CONTENT_HASH_MAX_BYTES", 0)
    big = sh.cache_key(data, str(tiny_model))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert sh.cache_key(data, str(tiny_model)) != big


def test_an_unfinished_build_is_not_reused(tmp_path, tiny_model):
    data = DatasetSpec(path=str(EXAMPLES / "data" / "train.jsonl"))
    s = _build(data, str(tiny_model), tmp_path / "shards")
    assert s is not None and not s.built
    (tmp_path / "shards" / "index.json").unlink()  # a build that died before its index
    assert sh.open_shards(str(tmp_path / "shards")) is None


def test_bad_columns_fail_in_the_driver_naming_the_field(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.training.data import check_columns

    with pytest.raises(RaylaneError, match=r"no column 'prompt' \(columns: text\)") as e:
        check_columns(DatasetSpec(path=str(EXAMPLES / "data" / "train.jsonl"), text_column="prompt"))
    assert "data.text_column" in e.value.hint
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(RaylaneError, match=r"no column 'text' \(columns: body\)"):
        check_columns(DatasetSpec(path=str(tmp_path / "d.parquet")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RaylaneError, match="has no rows"):
        check_columns(DatasetSpec(path=str(tmp_path / "empty.jsonl")))
