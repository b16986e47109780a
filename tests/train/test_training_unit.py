"""Unit tier for training: spec rules, data position, placement arithmetic, eval gate, registry aliases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import RaylaneError, SpecError
from runtime.specs import load_spec, parse_spec
from tests.conftest import EXAMPLES, run_cli


def _ft(**over):
    base = {"kind": "FineTune", "name": "ft", "base_model": "tiny", "data": {"path": "x.jsonl"}}
    base.update(over)
    return base


def test_examples_validate():
    train, ft = load_spec(EXAMPLES / "train.yaml"), load_spec(EXAMPLES / "finetune.yaml")
    assert train.kind == "Training" and ft.kind == "FineTune"
    assert ft.registered_name() == "support-lora"
    assert (EXAMPLES / ft.data.path.removeprefix("examples/")).is_file()


def test_spec_errors_name_every_field():
    with pytest.raises(SpecError) as e:
        parse_spec(_ft(train={"steps": 5, "epochs": 2, "step_fn": "no-colon", "lerning_rate": 1},
                       placement={"strategy": "SPREAD_OUT"}))
    text = str(e.value)
    assert "train.step_fn" in text and "did you mean 'learning_rate'" in text
    assert "placement.strategy" in text
    with pytest.raises(SpecError, match="either 'steps' or 'epochs'"):
        parse_spec(_ft(train={"steps": 5, "epochs": 2}))


def test_model_config_heads_must_divide():
    with pytest.raises(SpecError, match="not divisible"):
        parse_spec({"kind": "Training", "name": "t", "data": {"path": "x"}, "model": {"hidden_size": 100, "num_heads": 3}})


def test_steps_default_and_epochs():
    assert parse_spec(_ft()).train.steps == 100
    s = parse_spec(_ft(train={"epochs": 2}))
    assert s.train.steps is None and s.train.epochs == 2


def test_split_is_stable_as_data_grows():
    from runtime.training.data import split

    docs = [f"document number {i}" for i in range(400)]
    _, held = split(docs, 0.1)
    _, held_more = split(docs + [f"new document {i}" for i in range(100)], 0.1)
    assert set(held) <= set(held_more)
    assert 20 <= len(held) <= 60  # about 10 %


def test_batch_indices_cover_each_epoch_once_across_ranks():
    from runtime.training.data import batch_indices, steps_per_epoch

    n, bs, world = 50, 4, 2
    spe = steps_per_epoch(n, bs, world)
    for epoch in range(2):
        seen = np.concatenate([batch_indices(epoch * spe + k, num_blocks=n, batch_size=bs, world_size=world,
                                             rank=r, seed=3) for k in range(spe) for r in range(world)])
        assert len(seen) == len(set(seen.tolist())) == spe * bs * world
    # a resumed step reads the same data as the first time
    a = batch_indices(7, num_blocks=n, batch_size=bs, world_size=world, rank=1, seed=3)
    b = batch_indices(7, num_blocks=n, batch_size=bs, world_size=world, rank=1, seed=3)
    assert a.tolist() == b.tolist()


def test_read_chat_and_text_data(tiny_model):
    from transformers import AutoTokenizer

    from runtime.specs.training import DatasetSpec
    from runtime.training.data import load_documents, pack

    tok = AutoTokenizer.from_pretrained(tiny_model)
    chat = load_documents(DatasetSpec(path=str(EXAMPLES / "data" / "chat.jsonl"), messages_column="messages"), tok)
    assert chat[0].startswith("<|user|>\n") and "<|assistant|>\n" in chat[0]
    text = load_documents(DatasetSpec(path=str(EXAMPLES / "data" / "train.jsonl")), tok)
    blocks = pack(tok, text, 64)
    assert blocks.shape[1] == 64 and blocks.shape[0] > 100
    with pytest.raises(RaylaneError, match="no column 'prompt'"):
        load_documents(DatasetSpec(path=str(EXAMPLES / "data" / "train.jsonl"), text_column="prompt"), tok)


def test_parquet_data(tmp_path, tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.specs.training import DatasetSpec
    from runtime.training.data import load_documents

    pq.write_table(pa.table({"text": ["a b c", "d e f"]}), tmp_path / "d.parquet")
    assert load_documents(DatasetSpec(path=str(tmp_path))) == ["a b c", "d e f"]


def test_lr_schedules():
    from runtime.training.loop import lr_lambda

    cos = lr_lambda("cosine", 2, 12)
    assert cos(0) == 0.5 and cos(1) == 1.0 and cos(2) == 1.0 and cos(12) == pytest.approx(0.0)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_missing_resources_are_named():
    from runtime.placement import missing_resources

    two_gpu = [{"CPU": 1.0, "GPU": 1.0}] * 2
    node = {"CPU": 8.0, "GPU": 1.0}
    msg = missing_resources(two_gpu, "PACK", [node])
    assert msg and "needs 2 GPU in total, the cluster has 1 GPU (missing 1 GPU)" in msg[0]
    spread = missing_resources([{"CPU": 1.0}] * 3, "STRICT_SPREAD", [{"CPU": 8.0}])
    assert any("missing 2 node(s)" in m for m in spread)
    packed = missing_resources([{"CPU": 4.0}] * 2, "STRICT_PACK", [{"CPU": 4.0}, {"CPU": 4.0}])
    assert any("STRICT_PACK needs one node with 8 CPU" in m for m in packed)
    assert missing_resources([{"CPU": 1.0}] * 2, "PACK", [{"CPU": 4.0}]) == []
    h100 = [{"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}] * 2
    l4_node = {"CPU": 8.0, "GPU": 8.0, "accelerator_type:L4": 1.0}
    assert missing_resources(h100, "PACK", [l4_node, {"CPU": 2.0}]) == [
        "no node has accelerator type H100 (resources.accelerator_type); the cluster's nodes have: L4"]


def test_gate_promotes_only_past_the_margin():
    from runtime.training.evaluate import gate_decision

    assert gate_decision({"eval_loss": 3.0}, None, "eval_loss").promote
    assert gate_decision({"eval_loss": 2.9}, {"eval_loss": 3.0}, "eval_loss", margin=0.05).promote
    refused = gate_decision({"eval_loss": 2.98}, {"eval_loss": 3.0}, "eval_loss", margin=0.05)
    assert not refused.promote and "stays challenger" in refused.reason
    assert gate_decision({"acc": 0.8}, {"acc": 0.7}, "acc", higher_is_better=True).promote
    assert not gate_decision({"acc": 0.6}, {"acc": 0.7}, "acc", higher_is_better=True).promote
    assert not gate_decision({"eval_loss": 1.0}, None, "bleu").promote


def test_drift_degradation():
    from runtime.training.drift import degradation, drift_run_name

    assert degradation(2.0, 2.5) == pytest.approx(0.25)
    name = drift_run_name("a" * 63, now=1700000000)
    assert len(name) <= 63 and name.endswith("-drift-1700000000")
    assert parse_spec({"kind": "Training", "name": name, "data": {"path": "x"}}).name == name


def test_registry_aliases_promote_rollback(tmp_path, monkeypatch):
    from runtime.registry import Registry, resolve_registry_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for d in ("m1", "m2"):
        (tmp_path / d).mkdir()
    reg = Registry(str(tmp_path))
    assert reg.uri == f"sqlite:///{tmp_path}/registry/mlflow.db"
    v1 = reg.register("bot", str(tmp_path / "m1"), params={"lr": 1}, metrics={"eval_loss": 3.0},
                      tags={"raylane.run": "r1"})
    assert v1.version == 1 and v1.aliases == ["challenger"] and v1.metrics == {"eval_loss": 3.0}
    reg.promote("bot", 1)
    reg.register("bot", str(tmp_path / "m2"), params={}, metrics={"eval_loss": 2.0}, tags={})
    assert {v.version: v.aliases for v in reg.list("bot")} == {1: ["champion"], 2: ["challenger"]}
    reg.promote("bot", 2)
    assert {v.version: v.aliases for v in reg.list("bot")} == {1: ["previous"], 2: ["champion"]}
    assert resolve_registry_uri("models:/bot@champion", str(tmp_path)) == str(tmp_path / "m2")
    assert resolve_registry_uri("models:/bot/1", str(tmp_path)) == str(tmp_path / "m1")
    reg.rollback("bot")
    assert reg.alias("bot", "champion").version == 1
    assert reg.find_source("bot", str(tmp_path / "m2")).version == 2
    with pytest.raises(RaylaneError, match="no version with alias 'nope'"):
        resolve_registry_uri("models:/bot@nope", str(tmp_path))
    with pytest.raises(RaylaneError, match="bad registry reference"):
        resolve_registry_uri("models:/bot", str(tmp_path))

    # the CLI over the same registry
    env = {"RAYLANE_STORAGE_ROOT": str(tmp_path)}
    r = run_cli("registry", "list", "bot", "--json", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {v["version"]: v["aliases"] for v in json.loads(r.stdout)["versions"]} == {1: ["champion"], 2: ["previous"]}
    r = run_cli("registry", "promote", "bot", "7", env=env, timeout=120)
    assert r.returncode == 1 and "no version 7" in r.stderr and "Traceback" not in r.stderr


def test_models_resolve_registry_alias(tmp_path, monkeypatch):
    """Batch and serving specs name registry models; runtime.models hands them to the registry."""
    from runtime.models import resolve_model
    from runtime.registry import Registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "adapter").mkdir()
    reg = Registry(str(tmp_path))
    v = reg.register("m", str(tmp_path / "adapter"), params={}, metrics={}, tags={})
    reg.promote("m", v.version)
    assert resolve_model("models:/m@champion", str(tmp_path)) == str(tmp_path / "adapter")


def test_example_data_is_the_generated_corpus(tmp_path):
    from runtime.training.data import write_demo_data

    write_demo_data(tmp_path / "t.jsonl", tmp_path / "c.jsonl")
    assert (tmp_path / "t.jsonl").read_bytes() == (EXAMPLES / "data" / "train.jsonl").read_bytes()
    assert (tmp_path / "c.jsonl").read_bytes() == (EXAMPLES / "data" / "chat.jsonl").read_bytes()


def test_jobs_refuse_the_wrong_kind():
    import subprocess
    import sys

    from tests.conftest import ROOT

    r = subprocess.run([sys.executable, "-m", "jobs.finetune", "--spec", str(EXAMPLES / "train.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 2 and "is a Training spec; jobs.finetune runs FineTune specs" in r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.batch_infer", "--spec", str(EXAMPLES / "serve.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 2 and "is a OnlineInference spec; jobs.batch runs BatchInference specs" in r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.drift_check", "--spec", str(EXAMPLES / "train.yaml"), "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 1 and "with a 'drift:' section" in r.stderr and "Traceback" not in r.stderr


def test_live_curves_reach_mlflow_in_batches_and_skip_a_store_on_another_node(tmp_path):
    from mlflow.tracking import MlflowClient

    from runtime.registry import Registry
    from runtime.training.tracking import LiveCurves

    reg = Registry(str(tmp_path))
    run_id = reg.start_run("curves", {"raylane.run": "curves"})
    curves = LiveCurves(reg.uri, run_id)
    for step in (5, 10, 15):
        curves.log(step, loss=4.0 / step, lr=1e-3, grad_norm=0.5, tokens_per_s=1000.0 + step)
    curves.close()
    client = MlflowClient(tracking_uri=reg.uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(5, 0.8), (10, 0.4), (15, 4.0 / 15)]
    assert [m.step for m in client.get_metric_history(run_id, "tokens_per_s")] == [5, 10, 15]
    # A SQLite store that is not on this node: nothing is created there, and training is not held up.
    missing = tmp_path / "elsewhere" / "mlflow.db"
    other = LiveCurves(f"sqlite:///{missing}", run_id)
    other.log(1, loss=1.0)
    other.close(timeout_s=10)
    assert not other._thread.is_alive() and not missing.exists()
