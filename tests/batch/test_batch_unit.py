"""Batch inference logic without Ray: spec, input reading, shards, commits, verify, outliers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runtime.batch import shards as sh
from runtime.batch.corpus import sample_corpus
from runtime.batch.engine import prepare_prompts, prompt_limit
from runtime.errors import RaylaneError, SpecError
from runtime.specs import load_spec, parse_spec
from tests.conftest import EXAMPLES, run_cli


def _spec(**over):
    base = {"kind": "BatchInference", "name": "t", "model": "tiny", "input": {"path": "x.jsonl"}, "output": {}}
    base.update(over)
    return parse_spec(base)


def test_example_spec_validates_and_its_corpus_is_the_generator_output():
    spec = load_spec(EXAMPLES / "batch.yaml")
    assert spec.kind == "BatchInference" and spec.rows_per_shard == 100
    lines = (EXAMPLES / "data" / "corpus.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == sample_corpus(1000)


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError) as e:
        parse_spec({"kind": "BatchInference", "name": "t", "model": "tiny",
                    "input": {"path": "x", "prompt_colum": "p"}, "rows_per_shard": 0,
                    "engine_kwargs": {"max_model_len": 9}, "schedule": "daily"})
    msg = str(e.value)
    assert "input.prompt_colum: unknown field; did you mean 'prompt_column'?" in msg
    assert "rows_per_shard" in msg and "engine_kwargs" in msg and "schedule" in msg


def test_output_path_defaults_under_the_storage_root():
    spec = _spec(storage={"root": "/data/rl"})
    assert spec.output_path() == "/data/rl/runs/t/output"
    assert _spec(output={"path": "s3://b/o"}).output_path() == "s3://b/o"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_read_input_formats_in_file_order(tmp_path: Path, fmt: str):
    rows = [{"id": i, "prompt": f"p{i}"} for i in range(7)]
    d = tmp_path / "in"
    d.mkdir()
    for part, chunk in (("b", rows[4:]), ("a", rows[:4])):  # names sort a, b
        table = pa.Table.from_pylist(chunk)
        f = d / f"{part}.{fmt}"
        if fmt == "jsonl":
            f.write_text("".join(json.dumps(r) + "\n" for r in chunk))
        elif fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, f)
        else:
            pq.write_table(table, f)
    table = sh.read_input(str(d))
    assert sh.check_columns(table, "id", "prompt") == [str(i) for i in range(7)]


def test_duplicate_or_missing_ids_and_columns_are_user_errors():
    t = pa.table({"id": [1, 2, 2], "prompt": ["a", "b", "c"]})
    with pytest.raises(RaylaneError, match="not unique"):
        sh.check_columns(t, "id", "prompt")
    with pytest.raises(RaylaneError, match="no column 'text'"):
        sh.check_columns(t, "id", "text")
    with pytest.raises(RaylaneError, match="have no 'id'"):
        sh.check_columns(pa.table({"id": [1, None], "prompt": ["a", "b"]}), "id", "prompt")


def test_shards_are_fixed_slices():
    assert sh.shard_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert sh.shard_ranges(6, 3) == [(0, 3), (3, 6)]


def _fake_output(out: Path, n: int = 10, per: int = 4, fmt: str = "jsonl") -> list[str]:
    """An output folder as run_batch leaves it, with made-up generations."""
    ids = [f"r{i}" for i in range(n)]
    input_path = out.parent / "in.jsonl"
    input_path.write_text("".join(json.dumps({"id": i, "prompt": "x"}) + "\n" for i in ids))
    ranges = sh.shard_ranges(n, per)
    sh.ensure_plan(str(out), sh.ShardPlan(str(input_path), n, per, len(ranges), sh.ids_digest(ids), fmt, "id", "jsonl"))
    for k, (lo, hi) in enumerate(ranges):
        rows = [{"id": i, "output": "y", "error": None if j % 3 else "empty prompt",
                 "num_input_tokens": 1, "num_output_tokens": 2} for j, i in enumerate(ids[lo:hi])]
        sh.commit_shard(str(out), fmt, k, rows, run_id="run-1")
    return ids


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_verify_passes_on_a_complete_output(tmp_path: Path, fmt: str):
    _fake_output(tmp_path / "out", fmt=fmt)
    r = sh.verify_output(str(tmp_path / "out"))
    assert r.ok, r.problems
    assert (r.rows_in, r.rows_out + r.rows_error, r.shards_total, r.checked_against_input) == (10, 10, 3, True)
    assert r.rows_error == 5  # j % 3 == 0: j=0,3 | 0,3 | 0 in shards of 4, 4, 2


def test_verify_catches_deleted_truncated_and_duplicated_shards(tmp_path: Path):
    out = tmp_path / "out"
    _fake_output(out)
    (out / "shard-00001.jsonl").unlink()
    data = (out / "shard-00002.jsonl").read_bytes()
    (out / "shard-00002.jsonl").write_bytes(data[: len(data) // 2])
    r = sh.verify_output(str(out))
    assert not r.ok
    text = "\n".join(r.problems)
    assert "shard-00001.jsonl: committed but the file is missing" in text
    assert "shard-00002.jsonl" in text and "truncated" in text
    assert "input ids have no output row" in text


def test_verify_catches_a_missing_commit_and_a_row_written_twice(tmp_path: Path):
    out = tmp_path / "out"
    _fake_output(out)
    (out / "_commits" / "shard-00002.json").unlink()
    # Copy a row of shard 0 into shard 1 and re-commit it: a double write that checksums can't see.
    rows0 = sh.decode_rows((out / "shard-00000.jsonl").read_bytes(), "jsonl")
    rows1 = sh.decode_rows((out / "shard-00001.jsonl").read_bytes(), "jsonl")
    sh.commit_shard(str(out), "jsonl", 1, rows1 + rows0[:1], run_id="run-2")
    r = sh.verify_output(str(out))
    text = "\n".join(r.problems)
    assert "shard-00002: not committed (missing shard)" in text
    assert "id 'r0' appears twice" in text


def test_a_rerun_with_other_input_or_sharding_is_refused(tmp_path: Path):
    out = tmp_path / "out"
    ids = _fake_output(out)
    plan = sh.ShardPlan(str(tmp_path / "in.jsonl"), 10, 5, 2, sh.ids_digest(ids), "jsonl", "id", "jsonl")
    with pytest.raises(RaylaneError, match="rows_per_shard"):
        sh.ensure_plan(str(out), plan)


def test_verify_cli_json_and_exit_codes(tmp_path: Path):
    out = tmp_path / "out"
    _fake_output(out)
    ok = run_cli("batch", "verify", str(out), "--json", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    (out / "shard-00000.jsonl").write_text("")
    bad = run_cli("batch", "verify", str(out), timeout=120)
    assert bad.returncode == 1
    assert "INCOMPLETE" in bad.stdout and "shard-00000.jsonl" in bad.stdout
    missing = run_cli("batch", "verify", str(tmp_path / "nope"), timeout=120)
    assert missing.returncode == 1 and "not a batch output folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_outliers_become_error_reasons(tiny_model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    spec = _spec(max_prompt_tokens=20, max_model_len=64)
    assert prompt_limit(spec) == (20, "max_prompt_tokens")
    out = prepare_prompts(spec, ["hello world", "", "   ", None, 7, "word " * 50], tok)
    assert isinstance(out[0], list) and len(out[0]) == len(tok("hello world")["input_ids"])
    assert out[1:4] == ["empty prompt", "empty prompt", "empty prompt: null"]
    assert out[4].startswith("bad prompt")
    assert out[5].startswith("prompt too long") and "max_prompt_tokens limit of 20" in out[5]
    # Without max_prompt_tokens the model context is the limit.
    long = prepare_prompts(_spec(max_model_len=32), ["word " * 50], tok)[0]
    assert "max_model_len" in long


def test_chat_messages_use_the_chat_template(tiny_model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    spec = _spec(input={"path": "x.jsonl", "messages_column": "messages"})
    msgs = [{"role": "user", "content": "hi"}]
    out = prepare_prompts(spec, [msgs, [], [{"content": "no role"}]], tok)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out[0] == tok(text, add_special_tokens=False)["input_ids"]
    assert out[1] == "empty prompt: no messages"
    assert out[2].startswith("bad messages")


def test_an_engine_failure_keeps_committed_shards_and_says_how_to_resume(tiny_model: Path, tmp_path: Path,
                                                                         monkeypatch):
    """Runner logic only: the engine stage is replaced by one that commits a shard, then dies."""
    import contextlib

    from runtime.batch import plane as pl
    from runtime.batch import runner
    from runtime.errors import BatchEngineError

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "prompt": f"p {i}"}) + "\n" for i in range(6)))
    spec = _spec(model=str(tiny_model), input={"path": str(corpus)},
                 output={"path": str(tmp_path / "out"), "format": "jsonl"}, rows_per_shard=3)

    def half_engine(spec, address, plan, run):
        writer = pl.ShardWriter(*run.writer_args())
        writer.add({0: [{"id": str(i), "output": "x", "error": None, "num_input_tokens": 1, "num_output_tokens": 1}
                        for i in range(3)]})
        for rec in writer.drain()[0]:
            run.on_commit(rec)
        raise RuntimeError("engine died\nEngineDeadError: out of memory")

    @contextlib.contextmanager
    def local(address, spec=None):
        yield pl.LocalExecutor()

    monkeypatch.setattr(runner, "_executor", local)
    monkeypatch.setattr(runner, "_run_engine", half_engine)
    with pytest.raises(BatchEngineError) as e:
        runner.run_batch(spec)
    assert "1/2 shards were committed" in str(e.value) and "out of memory" in str(e.value)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert [s["status"] for s in manifest["shards"]] == ["committed", "missing"]
    assert not manifest["complete"]
    assert sorted(sh.read_commits(str(tmp_path / "out"))) == [0]


def test_engine_kwargs_offline_defaults_lora_and_user_overrides(tmp_path: Path):
    from runtime.batch.engine import engine_kwargs

    cpu = engine_kwargs(_spec(max_model_len=512), None)
    assert cpu["max_model_len"] == 512 and cpu["enforce_eager"] and cpu["max_num_seqs"] == 256
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12}))
    lora = engine_kwargs(_spec(engine_kwargs={"max_num_seqs": 64}), str(tmp_path))
    assert lora["enable_lora"] and lora["max_lora_rank"] == 16 and lora["max_num_seqs"] == 64
    gpu = engine_kwargs(_spec(resources={"gpus_per_worker": 1}), None)
    assert "enforce_eager" not in gpu and "max_num_seqs" not in gpu


def test_engine_rows_and_engine_errors_become_shard_rows():
    from runtime.batch.engine import ID, SHARD, engine_row

    ok = engine_row({ID: "a", SHARD: 0, "generated_text": "hi", "num_input_tokens": 3, "num_generated_tokens": 2,
                     "__inference_error__": ""})
    assert ok == {"id": "a", "output": "hi", "error": None, "num_input_tokens": 3, "num_output_tokens": 2}
    # should_continue_on_error: a failed row carries the error instead of generated text.
    bad = engine_row({ID: 7, SHARD: 0, "generated_text": "", "num_input_tokens": 0,
                      "__inference_error__": "ValueError: token id 9999 out of vocabulary"})
    assert bad["id"] == "7" and bad["output"] is None
    assert bad["error"] == "engine error: ValueError: token id 9999 out of vocabulary"


def test_processor_is_the_engine_stage_only_with_final_outputs(tmp_path):
    """No identity map stages around the engine; the engine stage asks vLLM for final outputs
    only and keeps the resources ray.data.llm computed (swapping the UDF must not re-validate
    the stage, which would ask for a GPU)."""
    from ray.llm._internal.batch.processor.base import Processor

    from runtime.batch.engine import (
        ID,
        SHARD,
        build_processor,
        engine_input,
        engine_output,
        sampling_params,
    )
    from runtime.batch.udf import FinalOutputEngineUDF

    spec = _spec()
    processor = build_processor(spec, str(tmp_path), None)
    assert processor.preprocess is None and processor.postprocess is None
    (stage,) = processor.stages.values()
    assert stage.fn is FinalOutputEngineUDF
    assert not stage.map_batches_kwargs.get("num_gpus") and stage.map_batches_kwargs["num_cpus"] == 1
    assert stage.map_batches_kwargs["runtime_env"]["env_vars"]["RAY_worker_niceness"] == "0"
    # The engine's stall deadline: from the shard's size unless the spec sets it.
    assert spec.engine_deadline_s() == 60 + 0.005 * spec.rows_per_shard * spec.sampling.max_tokens
    assert stage.map_batches_kwargs["runtime_env"]["env_vars"]["RAYLANE_ENGINE_DEADLINE_S"] == \
        str(spec.engine_deadline_s())
    assert _spec(shard_deadline_s=30).engine_deadline_s() == 30
    rows = engine_input(spec, None, [{ID: "a", SHARD: 0, "tokenized_prompt": [1, 2]}])
    assert rows == [{Processor.DATA_COLUMN: {ID: "a", SHARD: 0, "tokenized_prompt": [1, 2],
                                             "sampling_params": sampling_params(spec)}}]
    assert engine_output(pa.Table.from_pylist(rows).to_batches()[0]) == [rows[0][Processor.DATA_COLUMN]]


def test_shards_are_cut_from_per_file_counts_across_file_boundaries():
    from runtime.batch.plane import Piece, shard_pieces

    ranges, pieces = shard_pieces(["a", "b", "c"], [5, 0, 7], 4)
    assert ranges == [(0, 4), (4, 8), (8, 12)]
    assert pieces == [[Piece("a", 0, 4)], [Piece("a", 4, 5), Piece("c", 0, 3)], [Piece("c", 3, 7)]]


def test_digest_tasks_match_the_digests_of_the_whole_input(tmp_path: Path):
    """Per-shard digests from the shard's own file slices (what a worker computes) equal those
    over the whole input read at once (what main's driver computed): existing plans stay valid."""
    from runtime.batch import plane as pl

    folder = tmp_path / "in"
    folder.mkdir()
    rows = [{"id": f"x{i}", "prompt": f"p {i}" if i % 7 else None} for i in range(23)]
    for k, (lo, hi) in enumerate([(0, 5), (5, 5), (5, 16), (16, 23)]):
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[lo:hi]))
    files, fmt = sh.input_files(str(folder), None)
    ex = pl.LocalExecutor()
    counts = ex.map(pl.count_rows, [(str(folder), fmt, f) for f in files])
    ranges, pieces = pl.shard_pieces(files, counts, 4)
    digests, ids = ex.digest(pl.digest_calls(str(folder), fmt, pieces, "id", "prompt", 2))
    table = sh.read_input(str(folder))
    all_ids, texts = [str(v) for v in table.column("id").to_pylist()], table.column("prompt").to_pylist()
    assert [(d["ids"], d["prompts"]) for d in digests] == [sh.shard_digests(all_ids[lo:hi], texts[lo:hi])
                                                           for lo, hi in ranges]
    assert ids == {"duplicates": 0, "sample": [], "ids_sha256": sh.ids_digest(all_ids)}
    (folder / "part-9.jsonl").write_text(json.dumps({"id": "x3", "prompt": "again"}) + "\n")
    files, _ = sh.input_files(str(folder), None)
    counts = ex.map(pl.count_rows, [(str(folder), fmt, f) for f in files])
    _, dup = ex.digest(pl.digest_calls(str(folder), fmt, pl.shard_pieces(files, counts, 4)[1], "id", "prompt", 2))
    assert dup["duplicates"] == 1 and dup["sample"] == ["x3"]


def test_shard_writer_commits_each_shard_once_when_its_last_row_arrives(tmp_path: Path):
    from runtime.batch.plane import ShardWriter, error_row

    out = str(tmp_path / "out")

    def row(i):
        return {"id": f"r{i}", "output": "o", "error": None, "num_input_tokens": 1, "num_output_tokens": 2}

    w = ShardWriter(out, "jsonl", "run-1", {0: 2, 1: 3})
    w.add({1: [row(3)], 0: [row(1)]})
    assert w.drain() == ([], None)
    w.add({1: [row(3), row(4)], 0: [row(0), row(1)]})  # a retried batch: r1 and r3 again
    (rec0,), _ = w.drain()
    assert rec0.shard == 0 and rec0.rows == 2
    w.add({1: [error_row("r5", "empty prompt")], 0: [row(0)]})
    (rec1,), _ = w.drain()
    assert (rec1.shard, rec1.rows, rec1.rows_error, rec1.output_tokens) == (1, 3, 1, 4)
    assert w.pending() == {}
    assert [r["id"] for r in sh.decode_rows((tmp_path / "out" / rec1.file).read_bytes(), "jsonl")] == \
        ["r3", "r4", "r5"]
    # Lost lease: nothing more is committed, and the driver hears why.
    (tmp_path / "lease.json").write_text(json.dumps({"token": "someone-else"}))
    w2 = ShardWriter(out, "jsonl", "run-2", {2: 1}, str(tmp_path / "lease.json"), "mine")
    w2.add({2: [row(9)]})
    records, lost = w2.drain()
    assert records == [] and "another run holds" in lost and w2.pending() == {2: 0}


def test_node_labels_place_the_cpu_side_and_the_engine(tmp_path: Path):
    from runtime.batch.engine import build_processor
    from runtime.batch.plane import RayExecutor

    spec = _spec(prep_node_labels={"pool": "cpu"}, engine_node_labels={"pool": "in(engine,gpu)"})
    (stage,) = build_processor(spec, str(tmp_path), None).stages.values()
    assert stage.map_batches_kwargs["label_selector"] == {"pool": "in(engine,gpu)"}
    assert "label_selector" not in build_processor(_spec(), str(tmp_path), None).stages["vLLMEngineStage"] \
        .map_batches_kwargs
    assert RayExecutor(labels=spec.prep_node_labels).options == {"label_selector": {"pool": "cpu"}}
    assert RayExecutor().options == {}
    with pytest.raises(SpecError) as e:
        _spec(prep_node_labels={"bad key!": "x"})
    assert "prep_node_labels: not a Ray label selector" in str(e.value)
    with pytest.raises(SpecError) as e:
        _spec(engine_node_labels={"pool": "gpu"}, engine_kwargs={"tensor_parallel_size": 2})
    assert "engine_node_labels: not supported with tensor_parallel_size" in str(e.value)


def _row(i: int) -> dict:
    return {"id": f"r{i}", "output": "o", "error": None, "num_input_tokens": 1, "num_output_tokens": 2}


def test_a_restarted_writer_adopts_this_runs_commits_and_never_commits_a_shard_twice(tmp_path: Path):
    """What Ray's restart of the writer actor gives: the same arguments, an empty memory."""
    from runtime.batch.plane import ShardWriter

    out = str(tmp_path / "out")
    args = (out, "jsonl", "run-1", {0: 2, 1: 2, 2: 1})
    w = ShardWriter(*args)
    assert not w.was_restarted()  # not a Ray actor: a first start
    w.add({0: [_row(0), _row(1)], 1: [_row(2)]})
    (rec0,), _ = w.drain()
    sh.commit_shard(out, "jsonl", 2, [_row(9)], "run-0")  # another run's record is not this run's
    again = ShardWriter(*args)
    again.adopt_commits()  # what __init__ does when Ray restarted the actor
    assert again.drain() == ([rec0], None)  # the driver hears of shard 0 again (and counts it once)
    again.add({0: [_row(0), _row(1)]})  # a retried call: shard 0 is committed, so it is dropped
    assert again.drain() == ([], None) and sh.read_commits(out)[0] == rec0
    assert again.pending() == {1: 2, 2: 1}  # r2 went with the old writer's memory


def test_shards_a_restarted_writer_left_incomplete_run_again_in_one_more_pass(tiny_model: Path, tmp_path: Path,
                                                                            monkeypatch):
    """Runner logic only: the first pass commits shard 0 and ends with shard 1 incomplete after a
    writer restart; the finishing pass runs shard 1 alone. Without a restart it is an error."""
    import contextlib

    from runtime.batch import plane as pl
    from runtime.batch import runner
    from runtime.errors import BatchEngineError

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "prompt": f"p {i}"}) + "\n" for i in range(6)))
    spec = _spec(model=str(tiny_model), input={"path": str(corpus)},
                 output={"path": str(tmp_path / "out"), "format": "jsonl"}, rows_per_shard=3)
    passes: list[list[int]] = []

    def engine(restarted):
        def run_engine(spec, address, plan, run):
            passes.append(list(run.shards))
            writer = pl.ShardWriter(*run.writer_args())
            writer.adopt_commits()
            writer.add({i: [{**_row(k), "id": str(k)} for k in range(3 * i, 3 * i + 3)] for i in run.shards
                        if i == 0 or len(passes) > 1})
            for rec in writer.drain()[0]:
                run.on_commit(rec)
                run.on_commit(rec)  # heard twice (a restarted writer reports its commits again)
            return {i: n for i, n in writer.pending().items() if n}, restarted
        return run_engine

    @contextlib.contextmanager
    def local(address, spec=None):
        yield pl.LocalExecutor()

    monkeypatch.setattr(runner, "_executor", local)
    monkeypatch.setattr(runner, "_run_engine", engine(True))
    result = runner.run_batch(spec)
    assert result.ok and passes == [[0, 1], [1]] and result.rerun_shards == [1]
    assert (result.shards_run, result.rows_run, result.rows_out) == (2, 6, 6)

    passes.clear()
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"path": str(tmp_path / "out2")})})
    monkeypatch.setattr(runner, "_run_engine", engine(False))
    with pytest.raises(BatchEngineError) as e:
        runner.run_batch(spec)
    assert "ended with 1 shards incomplete: shard 1 (3 rows)" in str(e.value) and passes == [[0, 1]]
