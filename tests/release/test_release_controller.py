"""The rollout controller as a real detached Ray actor over a real MLflow SQLite registry (no
vLLM: the replicas' per-arm windows are written the way CanaryRouter writes them)."""

from __future__ import annotations

import time

import pytest
import yaml

from runtime import release
from runtime.release.windows import ArmRecorder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def serve(rec: ArmRecorder, rollout_id: str, step: int, champion: int, candidate: int) -> None:
    """What the replicas' routers record and flush: requests per arm with their latencies."""
    for arm, n in (("champion", champion), ("candidate", candidate)):
        for _ in range(n):
            rec.record(rollout_id, step, arm, ok=True, ttft_s=0.2, e2e_s=1.0)
    rec.flush()


def wait_for(predicate, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_controller_walks_the_steps_survives_a_kill_and_promotes(tmp_path, monkeypatch, ray_local):
    import ray

    from runtime.registry import Registry
    from runtime.release.controller import actor_name, start_controller, wait_done

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = str(tmp_path)
    reg = Registry(root)
    for v in (1, 2):
        (tmp_path / f"a{v}").mkdir()
        reg.register("bot", str(tmp_path / f"a{v}"), params={}, metrics={}, tags={})
    reg.promote("bot", 1)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none", "storage": {"root": root},
        "adapters": {"bot": "models:/bot@champion"},
        "rollout": {"adapter": "bot", "steps": [50, 100], "min_step_s": 1, "min_requests": 5, "interval_s": 0.3},
    }))
    st = release.rollout_start(path)
    rec = ArmRecorder(root, "chat", replica="replica-a")
    serve(rec, st.rollout_id, 0, champion=20, candidate=10)

    controller = start_controller("chat", root)
    assert wait_for(lambda: release.rollout_status("chat", root).step == 1)
    ray.kill(controller, no_restart=True)  # the controller dies mid-rollout
    with pytest.raises(ValueError):
        ray.get_actor(actor_name("chat"), namespace="raylane")
    saved = release.rollout_status("chat", root)
    assert (saved.state, saved.step, saved.weight) == ("progressing", 1, 100)

    serve(rec, st.rollout_id, 1, champion=0, candidate=10)  # at 100 % only the candidate serves
    controller = release.rollout_control("chat", ray_local.address, root)  # a new one continues
    done = wait_done("chat", root, timeout_s=60)
    assert done.state == "promoted", done.reason
    assert done.history[: len(saved.history)] == saved.history  # nothing lost or redone
    verdicts = [h["verdict"] for h in done.history if h["verdict"] != "hold"]
    assert verdicts == ["advance", "promote"]
    assert "champion from the previous step" in done.history[-1]["reason"]
    # the state is saved before the registry moves: wait for the controller's last turn to end
    assert wait_for(lambda: not ray.get(controller.info.remote())["running"], 30)
    assert (reg.alias("bot", "champion").version, reg.alias("bot", "previous").version) == (2, 1)
    assert reg.get("bot", 2).tags[f"raylane.rollout.{st.rollout_id}.state"] == "promoted"
    ray.kill(controller)
