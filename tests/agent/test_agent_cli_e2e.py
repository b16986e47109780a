"""`raylane run examples/agent.yaml`: the shipped example served by the real CLI, with the tiny
model served beside it by ray.serve.llm (the agent calls it through a Serve handle)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.agent.conftest import free_port
from tests.conftest import EXAMPLES, ROOT

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(900)
def test_raylane_run_serves_the_example_agent_with_its_llm_app(tmp_path):
    spec = yaml.safe_load((EXAMPLES / "agent.yaml").read_text())
    port = free_port()
    spec.update(port=port, storage={"root": str(tmp_path / "root")}, session_workers=1)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAYLANE_API_KEYS": "cli-key", "RAY_ADDRESS": ""}
    err = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "raylane", "run", str(path), "--json"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer cli-key"}
    try:
        deadline = time.monotonic() + 600
        while "[agent] ready" not in (tmp_path / "stderr.log").read_text():
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "agent not ready in 600 s"
            time.sleep(2)
        with httpx.Client(base_url=base, headers=headers, timeout=300) as c:
            sid = c.post("/sessions").json()["id"]
            reply = c.post(f"/sessions/{sid}/messages", json={"content": "What is KubeRay? And 3*4?"}).json()
            session = c.get(f"/sessions/{sid}").json()
        assert reply["reply"] and reply["status"] == "active", reply
        tools = [s["tool"] for s in session["steps"] if s.get("tool")]
        assert len(tools) == 2 and {t["name"] for t in tools} <= {"calculator", "retrieve"}
        assert all(s["llm"]["guided"] and s["llm"]["tokens_out"] > 0 for s in session["steps"])
        # the LLM app is beside the agent, OpenAI-compatible under /llm, behind the same keys
        assert httpx.get(f"{base}/llm/v1/models", timeout=30).status_code == 401
        assert httpx.get(f"{base}/llm/v1/models", headers=headers, timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        err.close()
    assert proc.returncode == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["name"] == "helper" and result["tools"] == ["calculator", "retrieve"]
    assert result["index"]["chunks"] == 8 and result["url"] == base
    assert result["apps"] == ["helper-llm", "helper"] and result["served_seconds"] > 0
