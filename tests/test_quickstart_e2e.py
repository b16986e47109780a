"""End to end: the quickstart writes the tiny model and generates from it with vLLM on Ray."""

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quickstart_runs_every_stage(tmp_path):
    r = run_cli("quickstart", "--json", "--workdir", str(tmp_path / "qs"), timeout=1800)
    if r.returncode != 0:
        (tmp_path / "stderr.log").write_text(r.stderr)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout)  # exactly one JSON object on stdout, whatever Ray and vLLM print
    stages = {s["stage"]: s for s in out["stages"]}
    assert list(stages)[:2] == ["tiny-model", "generate"]
    gen = stages["generate"]
    assert gen["engine"] == "vllm" and gen["device"] == "cpu"
    assert gen["output_tokens"] == 2 * 16  # two prompts, 16 greedy tokens each, eos ignored
    assert (tmp_path / "qs" / "models" / "tiny-llama" / "model.safetensors").is_file()
