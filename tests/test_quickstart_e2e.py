"""End to end: `raylane quickstart` runs every stage on a local Ray cluster with real engines."""

import json

import pytest

from tests.conftest import EXAMPLES, run_cli


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quickstart_runs_every_stage(tmp_path):
    r = run_cli("quickstart", "--json", "--workdir", str(tmp_path / "qs"), timeout=2400)
    if r.returncode != 0:
        (tmp_path / "stderr.log").write_text(r.stderr)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)  # exactly one JSON object on stdout, whatever Ray and vLLM print
    stages = {s["stage"]: s for s in out["stages"]}
    assert (tmp_path / "qs" / "models" / "tiny-llama" / "model.safetensors").is_file()

    assert list(stages) == ["tiny-model", "train", "batch", "serve", "agent", "kuberay"]
    train = stages["train"]
    assert train["training"]["final_step"] == 20 and train["finetune"]["final_step"] == 30
    assert train["finetune"]["registry"]["version"] and train["finetune"]["adapter"]

    batch = stages["batch"]
    assert batch["verified"] and batch["rows_in"] == batch["rows_out"] + batch["rows_error"] == 200
    assert batch["rows_out"] > 0 and batch["tokens_per_s"] > 0  # real vLLM generation on the tiny model

    assert batch["adapter"] == train["finetune"]["adapter"]  # the fine-tuned adapter did the batch

    serve = stages["serve"]
    assert serve["reply"] and serve["adapter"] and serve["request_id"]

    agent = stages["agent"]
    assert agent["answered"] and agent["steps"] >= 1

    kuberay = stages["kuberay"]
    assert set(kuberay["rendered"]) == {p.name for p in EXAMPLES.glob("*.yaml")}
