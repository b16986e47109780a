"""End-to-end: ``raylane run examples/serve.yaml`` serves until interrupted (the user's path),
and ``serve_apps.llm`` validates its args before building anything."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT


def test_example_spec_validates():
    from runtime.specs import load_spec

    spec = load_spec(EXAMPLES / "serve.yaml")
    assert spec.kind == "OnlineInference" and spec.auth == "api-key"
    assert spec.autoscaling.floor(spec.slo) == 1  # an SLO keeps a warm replica


def test_builder_rejects_bad_args_before_building():
    from runtime.errors import SpecError
    from serve_apps.llm import app, build_llm_app

    with pytest.raises(SpecError, match="spec"):
        build_llm_app({})
    with pytest.raises(SpecError, match="unknown argument"):
        app({"spec": str(EXAMPLES / "serve.yaml"), "sepc": "x"})
    with pytest.raises(SpecError, match="args.spec"):
        build_llm_app({"spec": {"kind": "OnlineInference", "name": "a"}})  # no model


def test_api_key_auth_without_keys_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLANE_API_KEYS")}
    r = subprocess.run([sys.executable, "-m", "raylane", "run", str(EXAMPLES / "serve.yaml")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1
    assert "no API keys are configured" in r.stderr and "auth: none" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_raylane_run_serves_until_interrupted(tmp_path, tiny_model):
    from runtime.serving.deploy import free_port

    spec = yaml.safe_load((EXAMPLES / "serve.yaml").read_text())
    port = free_port()
    spec.update(model=str(tiny_model), port=port, storage={"root": str(tmp_path)})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAYLANE_API_KEYS": "cli-key", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "raylane", "run", str(path), "--json"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 600
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                m = re.search(r"\[serve\] ready: (http://\S+)/v1", lines.get(timeout=5))
                url = m.group(1) if m else None
            except queue.Empty:
                pass
        assert url == f"http://127.0.0.1:{port}", f"not ready (exit {proc.poll()})"
        with httpx.Client(base_url=url, timeout=120) as c:
            body = {"model": spec["model_id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                    "stream": True}
            assert c.post("/v1/chat/completions", json=body).status_code == 401
            with c.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": "Bearer cli-key"}) as r:
                assert r.status_code == 200
                assert [ln for ln in r.iter_lines() if ln.startswith("data: ")][-1] == "data: [DONE]"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        result = json.loads(out)
        assert result["url"] == url and result["model_ids"] == [spec["model_id"]] and result["ok"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_run_serves_the_example_spec(tmp_path):
    """`serve run serve_apps.llm:app spec=examples/serve.yaml`, Ray Serve's own CLI, against a
    running head node (4 logical CPUs: ray.serve.llm's ingress needs one of its own)."""
    import socket
    import tempfile

    from tests.ray_head import VENV_BIN, head_env
    from tests.ray_head import ray_head as start_head

    # Ray's socket paths under the temp dir must stay under 108 bytes: not pytest's long tmp_path.
    with start_head(tempfile.mkdtemp(prefix="raylane-head-"), num_cpus=4) as head:
        env = {**head_env(), "RAY_AUTH_MODE": "token", "RAYLANE_API_KEYS": "serve-run-key",
               "RAYLANE_STORAGE_ROOT": str(tmp_path / "store")}
        port = 8000  # `serve run` starts Serve with its default HTTP options
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "port 8000 is taken; serve run needs it"
        proc = subprocess.Popen([str(VENV_BIN / "serve"), "run", "--address", head.gcs_address,
                                 "serve_apps.llm:app", "spec=examples/serve.yaml"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        tail: list[str] = []
        threading.Thread(target=lambda: [tail.append(ln) for ln in proc.stderr], daemon=True).start()
        try:
            url = f"http://127.0.0.1:{port}"
            body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            deadline, r = time.monotonic() + 600, None
            with httpx.Client(base_url=url, timeout=60) as c:
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer serve-run-key"})
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(2)
                assert r is not None and r.status_code == 200, (proc.poll(), "".join(tail[-40:]))
                assert r.json()["choices"][0]["message"]["role"] == "assistant"
                assert c.post("/v1/chat/completions", json=body).status_code == 401
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
