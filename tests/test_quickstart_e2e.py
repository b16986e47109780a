"""End to end: `raylane quickstart` runs every stage on a local Ray cluster with real engines,
and a person can read what it prints: under 60 lines, engine logs in a file, no tracebacks,
and where to look next (paths that exist)."""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT, run_cli


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quickstart_runs_every_stage(tmp_path):
    r = run_cli("quickstart", "--workdir", str(tmp_path / "qs"), timeout=2400)
    terminal = r.stdout + r.stderr
    (tmp_path / "terminal.txt").write_text(terminal)
    assert r.returncode == 0, terminal[-4000:]
    out = json.loads((tmp_path / "qs" / "quickstart.json").read_text())  # every stage's result
    stages = {s["stage"]: s for s in out["stages"]}
    assert (tmp_path / "qs" / "models" / "tiny-llama" / "model.safetensors").is_file()

    assert list(stages) == ["tiny-model", "train", "batch", "serve", "release", "agent", "kuberay"]
    train = stages["train"]
    assert train["training"]["final_step"] == 20 and train["finetune"]["final_step"] == 30
    assert train["finetune"]["registry"]["version"] and train["finetune"]["adapter"]

    batch = stages["batch"]
    assert batch["verified"] and batch["rows_in"] == batch["rows_out"] + batch["rows_error"] == 200
    assert batch["rows_out"] > 0 and batch["tokens_per_s"] > 0  # real vLLM generation on the tiny model

    assert batch["adapter"] == train["finetune"]["adapter"]  # the fine-tuned adapter did the batch

    serve = stages["serve"]
    assert serve["reply"] and serve["adapter"] and serve["request_id"]
    assert serve["adapter_ref"] == "models:/quickstart-lora@champion"  # what a rollout releases into

    # drift -> fine-tune -> gate -> a canary on the live app -> promoted, every client request answered
    rel = stages["release"]
    assert rel["drift"]["action"] == "fine-tuned" and rel["gate"]["release"]["started"]
    assert (rel["state"], rel["champion_before"], rel["champion_after"]) == ("promoted", 1, 2)
    assert rel["candidate"] == "models:/quickstart-lora/2" and rel["failed"] == 0 and rel["requests"] > 0
    assert rel["arms"].get("champion", 0) > 0 and rel["arms"].get("candidate", 0) > 0  # both arms served
    assert [d["verdict"] for d in rel["decisions"]] == ["advance", "promote"], rel["decisions"]
    assert rel["rollout_seconds"] < 60, rel  # the rollout itself, from its start to the promotion

    agent = stages["agent"]
    assert agent["answered"] and agent["steps"] >= 1

    kuberay = stages["kuberay"]
    assert set(kuberay["rendered"]) == {p.name for p in EXAMPLES.glob("*.yaml")}

    # --- what a person sees -------------------------------------------------------------------
    lines = terminal.splitlines()
    assert len(lines) < 60, terminal
    assert "Traceback" not in terminal and "KeyError" not in terminal, terminal
    for name in stages:  # a finished line per stage, with its key figure
        assert re.search(rf"^✓ {re.escape(name)} +\d+\.\d s  \S", terminal, re.M), (name, terminal)
    assert re.search(r"TTFT \d+ ms", terminal) and re.search(r"[\d.]+ rows/s", terminal)
    assert "quickstart finished in" in terminal

    # the engines' logs went to the file, not the terminal
    log = Path(out["log_file"])
    assert log.is_file() and log.parent == tmp_path / "qs" / "logs" and f"logs: {log}" in terminal
    text = log.read_text()
    assert "EngineCore" in text and "(RayTrainWorker" in text and "ServeReplica" in text
    assert "EngineCore" not in terminal and "INFO" not in terminal
    # the shared-memory cleanup at batch shutdown is quiet in the log too
    assert "KeyError: '/psm_" not in text and "resource_tracker: process died unexpectedly" not in text

    where = _where_next(lines)
    for label in ("engine logs", "Ray session logs", "batch output", "batch manifest", "KubeRay manifests",
                  "every result"):
        assert Path(where[label]).exists(), (label, where[label])
    assert where["batch output"] == batch["output"] and Path(where["batch manifest"]).is_file()
    assert where["Ray dashboard"].startswith("http://")
    uri = where["MLflow UI"].removeprefix("mlflow ui --backend-store-uri ")
    assert uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite://")).is_file()
    runs = [v for k, v in where.items() if k.startswith("run ")]
    assert len(runs) == 5
    for cmd in runs:
        assert cmd.startswith("raylane run ") and (ROOT / cmd.removeprefix("raylane run ")).is_file(), cmd


def _where_next(lines: list[str]) -> dict[str, str]:
    """The 'Where to look next' block: two-space-indented `label   value` rows (a row without a
    label continues the one above; those get keys 'run 1', 'run 2', ...)."""
    start = lines.index("Where to look next")
    where: dict[str, str] = {}
    n = 0
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        label, value = line[2:20].strip(), line[21:].strip()
        if value.startswith("raylane run "):
            n += 1
            label = f"run {n}"
        where[label or f"more {len(where)}"] = value.split(" (")[0] if label == "Ray dashboard" else value
    return where
