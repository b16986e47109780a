"""Specs: every shape loads; every kind of bad input gives one complete, clear error."""

import textwrap

import pytest

from runtime.errors import SpecError
from runtime.specs import KINDS, dump_spec, load_spec, parse_spec
from tests.conftest import run_cli

GOOD = {
    "Training": {"kind": "Training", "name": "pretrain", "data": {"path": "data.jsonl"}},
    "FineTune": {"kind": "FineTune", "name": "lora", "base_model": "tiny", "data": {"path": "d.jsonl"}},
    "BatchInference": {
        "kind": "BatchInference", "name": "nightly", "model": "tiny",
        "input": {"path": "in.jsonl"}, "output": {"path": "out/"},
    },
    "OnlineInference": {"kind": "OnlineInference", "name": "chat", "model": "tiny"},
    "Agent": {"kind": "Agent", "name": "copilot"},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_shape_loads_with_common_fields(kind, tmp_path):
    data = {
        **GOOD[kind],
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 1, "accelerator_type": "A100-80GB"},
        "storage": {"root": "s3://bucket/raylane"},
        "queue": {"system": "kueue", "name": "team-a"},
        "priority": "high",
    }
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    assert type(spec) is KINDS[kind]
    assert spec.resources.num_workers == 2 and spec.resources.uses_gpu
    assert spec.storage.is_remote and spec.queue.system == "kueue"
    # dump -> parse round-trips to the same spec
    assert parse_spec(dump_spec(spec)) == spec


def test_dump_keeps_a_null_that_turns_off_a_default():
    # Replicas re-parse the dumped spec: rate_limit: null must not come back as the default limit.
    spec = parse_spec({"kind": "OnlineInference", "name": "chat", "model": "tiny", "rate_limit": None})
    dumped = dump_spec(spec)
    assert dumped["rate_limit"] is None and "slo" not in dumped  # slo defaults to null: left out
    assert parse_spec(dumped).rate_limit is None


def test_storage_root_defaults_to_env(monkeypatch):
    monkeypatch.setenv("RAYLANE_STORAGE_ROOT", "/data/raylane")
    assert parse_spec(GOOD["Agent"]).storage.root == "/data/raylane"


def _problems(data) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data, source="t.yaml")
    return {p.path: p.message for p in e.value.problems}


def test_unknown_field_is_rejected_with_suggestion():
    probs = _problems({**GOOD["OnlineInference"], "resources": {"num_worker": 2}})
    assert "resources.num_worker" in probs
    assert "did you mean 'num_workers'" in probs["resources.num_worker"]


def test_every_bad_field_is_listed_at_once():
    data = {
        "kind": "BatchInference",
        "name": "Bad_Name",
        "model": "tiny",
        "input": {"path": "x", "id_colum": "id"},
        "resources": {"num_workers": 0, "cpus_per_worker": "lots"},
        "queue": {"system": "slurm", "name": "q"},
        "rows_per_shard": -1,
        "typo_top": 1,
    }
    probs = _problems(data)
    assert set(probs) >= {
        "name", "input.id_colum", "resources.num_workers", "resources.cpus_per_worker",
        "queue.system", "rows_per_shard", "typo_top", "output",
    }
    assert "lowercase" in probs["name"]
    assert "greater than or equal to 1" in probs["resources.num_workers"]
    assert "kueue" in probs["queue.system"]
    assert "required field is missing" in probs["output"]


def test_unknown_kind_suggests_the_right_one():
    probs = _problems({"kind": "Finetune", "name": "x"})
    assert "did you mean 'FineTune'" in probs["kind"]
    assert "Training" in probs["kind"]  # lists the valid kinds


def test_missing_kind_and_name():
    probs = _problems({})
    assert "required" in probs["kind"] and "required" in probs["name"]


def test_nested_list_paths(tmp_path):
    probs = _problems({"kind": "Agent", "name": "a", "tools": [{"name": "calc", "import_path": "m:f", "timout_s": 1}]})
    assert "tools[0].timout_s" in probs
    assert "timeout_s" in probs["tools[0].timout_s"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("kind: Agent\nname: [unclosed\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert "line" in str(e.value) and "not valid YAML" in str(e.value)


def test_cli_validate_exits_2_with_complete_message_and_no_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(textwrap.dedent("""
        kind: FineTune
        name: my-lora
        base_model: tiny
        data: {path: d.jsonl, eval_fracton: 0.2}
        train: {learning_rate: -1}
    """))
    r = run_cli("validate", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "data.eval_fracton" in r.stderr and "eval_fraction" in r.stderr
    assert "train.learning_rate" in r.stderr
    assert r.stdout == ""


def test_cli_validate_json_ok(tmp_path):
    import json

    import yaml

    p = tmp_path / "ok.yaml"
    p.write_text(yaml.safe_dump(GOOD["OnlineInference"]))
    r = run_cli("validate", str(p), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["valid"] and out["kind"] == "OnlineInference"
    assert out["spec"]["resources"]["num_workers"] == 1


def test_run_of_missing_spec_file_is_a_clean_error(tmp_path):
    r = run_cli("run", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "file not found" in r.stderr and "Traceback" not in r.stderr
