"""End-to-end: raylane's Serve app on real vLLM (CPU, tiny model). One app for the module.

Covers chat / completions / streaming, every bad input the ingress must reject, LoRA adapter
routing, engine metrics for the autoscaler and Prometheus, and the rendered Serve config
deployed with ``serve deploy``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import restore_environ

pytestmark = [pytest.mark.slow, pytest.mark.ray]

KEY, OTHER_KEY, LIMITED_KEY = "test-key-1", "test-key-2", "test-key-limited"


def make_adapter(model_dir, out_dir, seed=0):
    """A random-weight peft LoRA adapter for the tiny model (so it changes greedy output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory, storage_root, ray_local):
    from ray import serve

    from runtime.serving import start_serving
    from runtime.specs import parse_spec

    saved = {k: os.environ.get(k) for k in ("RAYLANE_API_KEYS", "RAYLANE_API_KEYS_FILE")}
    os.environ["RAYLANE_API_KEYS"] = f"{KEY},{OTHER_KEY},{LIMITED_KEY}"
    os.environ.pop("RAYLANE_API_KEYS_FILE", None)
    from runtime.registry import Registry

    adapters = tmp_path_factory.mktemp("adapters")
    adapter = make_adapter(tiny_model, adapters / "support")
    # The same adapter registered as v1 and champion; v2 (other weights) waits to be promoted.
    registry = Registry(str(storage_root))
    v1 = registry.register("e2e-bot", str(adapter), params={}, metrics={}, tags={})
    registry.promote("e2e-bot", v1.version)
    registry.register("e2e-bot", str(make_adapter(tiny_model, adapters / "v2", seed=1)), params={}, metrics={},
                      tags={})
    spec = parse_spec({
        "kind": "OnlineInference", "name": "e2e-chat", "model": str(tiny_model), "model_id": "tiny",
        "adapters": {"support": str(adapter), "bot": "models:/e2e-bot@champion"}, "max_lora_rank": 8, "max_model_len": 256, "max_tokens_limit": 200, "max_num_seqs": 16,
        "storage": {"root": str(storage_root)}, "slo": {"ttft_ms_p95": 1000},
        "rate_limit": {"requests_per_minute": 60, "burst": 40},
    })
    result = start_serving(spec, port=0, timeout_s=600)
    client = httpx.Client(base_url=result.url, timeout=120)
    yield spec, result, client
    client.close()
    serve.shutdown()
    restore_environ(saved)


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def assert_clean_error(r, status):
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    body = r.json()
    assert body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body["error"]["message"]


@pytest.mark.timeout(900)
def test_chat_and_completions(served):
    _, result, c = served
    r = c.post("/v1/chat/completions", headers=auth(), json={
        "model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"]
    body = r.json()
    assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
    assert 0 < body["usage"]["completion_tokens"] <= 8
    r = c.post("/v1/completions", headers=auth(), json={
        "model": "tiny", "prompt": "Ray runs", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    models = c.get("/v1/models", headers=auth()).json()
    assert "tiny" in [m["id"] for m in models["data"]]


@pytest.mark.timeout(300)
def test_streaming_chat(served):
    _, _, c = served
    with c.stream("POST", "/v1/chat/completions", headers=auth(), json={
            "model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 12,
            "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers["x-request-id"]
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert len(chunks) >= 2 and text


@pytest.mark.timeout(300)
def test_every_bad_input_is_rejected_cleanly(served):
    spec, _, c = served
    good = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    assert "API key" in assert_clean_error(c.post("/v1/completions", json=good), 401)
    assert_clean_error(c.post("/v1/completions", json=good, headers=auth("nope")), 401)
    msg = assert_clean_error(c.post("/v1/completions", content=b'{"model": "tiny", "prompt": ',
                                    headers={**auth(), "content-type": "application/json"}), 400)
    assert "JSON" in msg
    assert "does not exist" in assert_clean_error(
        c.post("/v1/completions", json={**good, "model": "gpt-4"}, headers=auth()), 404)
    assert_clean_error(c.post("/v1/chat/completions", headers=auth(), json={
        "model": "tiny:unknown-adapter", "messages": [{"role": "user", "content": "x"}]}), 404)
    msg = assert_clean_error(c.post("/v1/completions", json={**good, "max_tokens": 10_000}, headers=auth()), 400)
    assert f"limit of {spec.max_tokens_limit} tokens (max_tokens_limit)" in msg
    # A prompt longer than max_model_len: the engine's own check, passed through as a clean 400.
    msg = assert_clean_error(c.post("/v1/completions", json={**good, "prompt": "hello " * 400}, headers=auth()), 400)
    assert str(spec.max_model_len) in msg


@pytest.mark.timeout(300)
def test_rate_limit_per_key(served):
    _, _, c = served
    # Over-limit requests are refused before any work: use a cheap request (unknown model -> 404).
    cheap = {"model": "nope", "prompt": "x"}
    codes = [c.post("/v1/completions", json=cheap, headers=auth(LIMITED_KEY)).status_code for _ in range(45)]
    assert codes[:40] == [404] * 40 and 429 in codes[40:]
    r = c.post("/v1/completions", json=cheap, headers=auth(LIMITED_KEY))
    assert_clean_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    # Another key is not affected.
    assert c.post("/v1/completions", json=cheap, headers=auth(OTHER_KEY)).status_code == 404


@pytest.mark.timeout(300)
def test_hardened_ingress(served):
    """Issue 15 on the live endpoint: limits that cannot be dodged, the route allow-list, exact
    open paths, malformed input as 400, no LoRA ids from junk model names."""
    spec, _, c = served
    # No max_tokens: max_tokens_limit applies (vLLM's own default would be the rest of the context).
    r = c.post("/v1/chat/completions", headers=auth(), json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == spec.max_tokens_limit
    for method, path in (("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/tokenize"), ("POST", "/detokenize"),
                         ("POST", "/pooling"), ("POST", "/score"), ("POST", "/invocations"),
                         ("POST", "/v1/load_lora_adapter"), ("POST", "/sleep"), ("POST", "/collective_rpc"),
                         ("POST", "/start_profile"), ("POST", "/reset_prefix_cache")):
        r = c.request(method, path, headers=auth(), json={"model": "tiny", "prompt": "hi", "lora_name": "x",
                                                          "lora_path": "/tmp"})
        assert_clean_error(r, 404)
    assert c.get("/health").status_code == 200  # open, exactly
    assert_clean_error(c.get("/healthXYZ"), 401)
    nan = b'{"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": NaN}'
    assert_clean_error(c.post("/v1/completions", content=nan, headers={**auth(), "content-type": "application/json"}),
                       400)
    assert_clean_error(c.post("/v1/completions", json={"model": ["tiny"], "prompt": "x"}, headers=auth()), 400)
    assert_clean_error(c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 1000}, headers=auth()),
                       400)
    deep = b"[" * 50_000 + b"]" * 50_000
    assert_clean_error(c.post("/v1/completions", content=deep, headers={**auth(), "content-type": "application/json"}),
                       400)
    # Junk model names never register a LoRA id, on any route.
    for i, path in enumerate(("/tokenize", "/v1/completions", "/invocations")):
        c.post(path, headers=auth(), json={"model": f"junk{i}:support", "prompt": "hi", "max_tokens": 2})
    ids = [m["id"] for m in c.get("/v1/models", headers=auth()).json()["data"]]
    assert not [i for i in ids if i.startswith("junk")], ids


def test_replica_http_ports_bind_the_spec_host(served):
    """The replica's own HTTP port (direct ingress, behind HAProxy) listens where the spec says
    (127.0.0.1 on a local run), not on every interface."""
    import psutil
    import ray

    spec, _, _ = served
    (name,) = _engine_replica_actors(spec.name)
    pid = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    from ray.serve._private.constants import (
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT as HI,
    )
    from ray.serve._private.constants import (
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT as LO,
    )

    listening = [conn.laddr for conn in psutil.Process(pid).net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN]
    http = [addr for addr in listening if LO <= addr.port <= HI]  # the rest is Ray's own worker gRPC
    assert http, f"no direct-ingress HTTP port among {listening}"
    assert {addr.ip for addr in http} == {spec.host}, http


@pytest.mark.timeout(300)
def test_api_key_values_never_reach_ray_state_or_logs(served, ray_local):
    """Keys were exported only in this process: replicas got a keys-file path, never a value, so
    no key is in the Serve REST API, the actor list or any log of the session."""
    import dataclasses

    import ray
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )
    from ray.util.state import list_actors

    spec, _, c = served
    assert c.get("/v1/models", headers=auth()).status_code == 200  # the keys work
    secrets_ = [k.encode() for k in (KEY, OTHER_KEY, LIMITED_KEY)]
    r = httpx.get(f"{ray_local.dashboard_url}/api/serve/applications/", timeout=60,
                  headers=get_auth_headers_if_auth_enabled({}))
    assert r.status_code == 200 and spec.name in r.text
    assert not [k for k in secrets_ if k in r.content]
    actors = repr([dataclasses.asdict(a) if dataclasses.is_dataclass(a) else a
                   for a in list_actors(address=ray_local.dashboard_url, detail=True, limit=10_000)]).encode()
    assert b"SERVE_REPLICA" in actors and not [k for k in secrets_ if k in actors]
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    hits, files, env_logged = [], 0, False
    for folder, _, names in os.walk(logs):
        for n in names:
            path = os.path.join(folder, n)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            files += 1
            env_logged |= b"RAYLANE_API_KEYS_FILE" in data  # the runtime env is logged: with a path only
            hits += [f"{path}: {k.decode()}" for k in secrets_ if k in data]
    assert files > 10 and env_logged and not hits, hits


@pytest.mark.timeout(300)
def test_adapter_routing_changes_output(served):
    spec, _, c = served

    def complete(model):
        r = c.post("/v1/completions", headers=auth(), json={
            "model": model, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.json()["choices"][0]["text"]

    base, tuned = complete("tiny"), complete("tiny:support")
    assert base != tuned
    assert complete("tiny:support") == tuned  # deterministic, routed to the same adapter
    # The registry alias serves the champion (v1: the same weights as 'support')...
    assert complete("tiny:bot") == tuned
    # ...and promoting v2 reaches the running replica with no redeploy.
    from runtime.registry import Registry

    registry = Registry(str(spec.storage.root))
    registry.promote("e2e-bot", 2)
    deadline, now = time.monotonic() + 60, tuned
    while now == tuned and time.monotonic() < deadline:
        time.sleep(2)
        now = complete("tiny:bot")
    assert now not in (tuned, base), "the new champion was not picked up within 60 s"
    assert complete("tiny:bot") == now


@pytest.mark.timeout(300)
def test_adapter_canary_rollout_on_the_live_engine(served, tiny_model, tmp_path):
    """Issue 16 on the module's engine (no new one): a rollout of the 'bot' adapter routes the
    stable id to the candidate by weight, says which version served, counts each arm, and its
    promotion reaches the replica through the registry alias."""
    import dataclasses

    from runtime import release
    from runtime.registry import Registry
    from runtime.release.state import RolloutStore
    from runtime.release.windows import read_windows
    from runtime.specs.serving import RolloutSpec

    spec, _, c = served
    root = str(spec.storage.root)
    registry = Registry(root)
    v3 = registry.register("e2e-bot", str(make_adapter(tiny_model, tmp_path / "v3", seed=2)), params={},
                           metrics={}, tags={})

    def complete(stream=False):
        body = {"model": "tiny:bot", "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        r = c.post("/v1/completions", headers=auth(OTHER_KEY), json=body)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            assert chunks and {ch["model"] for ch in chunks} == {"tiny:bot"}
            return r, "".join(ch["choices"][0]["text"] for ch in chunks)
        assert r.json()["model"] == "tiny:bot"  # the stable id, whichever arm served
        return r, r.json()["choices"][0]["text"]

    def until(arm):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r, text = complete()
            if r.headers.get("x-raylane-arm") == arm:
                return r, text
            time.sleep(0.5)
        raise AssertionError(f"no response from the {arm} arm within 30 s")

    r, champion_text = complete()
    assert "x-raylane-arm" not in r.headers  # no rollout: nothing routed
    rollout = RolloutSpec(adapter="bot", steps=[100], min_step_s=0, min_requests=2, controller="manual",
                          checks={"max_ttft_p95_ratio": None, "max_e2e_p95_ratio": None})  # decided by hand below
    st = release.rollout_start(spec.model_copy(update={"rollout": rollout}), candidate=f"models:/e2e-bot/{v3.version}")
    r, candidate_text = until("candidate")  # the state reaches the replica within seconds
    assert r.headers["x-raylane-model-version"] == f"models:/e2e-bot/{v3.version}"
    assert candidate_text != champion_text  # other weights: the candidate adapter really served it
    assert complete(stream=True)[1] == candidate_text
    RolloutStore(root).save(dataclasses.replace(st, weight=0.0))  # the same step, all to the champion
    r, text = until("champion")
    assert text == champion_text and r.headers["x-raylane-model-version"] == st.champion
    assert complete()[1] == champion_text  # min_requests 2 on the champion too
    time.sleep(3)  # the replica flushes its counts every 2 s
    w = read_windows(root, spec.name, st.rollout_id, 0)
    assert w["candidate"].requests >= 2 and w["champion"].requests >= 1 and w["candidate"].errors == 0
    assert w["candidate"].ttft_p95_s is not None
    st = release.rollout_evaluate(spec.name, w["champion"], w["candidate"], storage_root=root)
    assert st.state == "promoted", st.reason
    assert registry.alias("e2e-bot", "champion").version == v3.version
    r, text = complete()  # just promoted: the candidate keeps the traffic while alias caches move on
    assert text == candidate_text and r.headers["x-raylane-arm"] == "candidate"
    time.sleep(6)  # replicas re-resolve the alias every 5 s; then end the grace period early
    done = release.rollout_status(spec.name, root)
    RolloutStore(root).save(dataclasses.replace(done, updated_at=done.updated_at - 60))
    deadline = time.monotonic() + 30
    while "x-raylane-arm" in r.headers and time.monotonic() < deadline:
        time.sleep(0.5)
        r, text = complete()
    assert "x-raylane-arm" not in r.headers and text == candidate_text  # the alias serves the new champion


@pytest.mark.timeout(300)
def test_engine_metrics_reach_autoscaler_and_prometheus(served, ray_local):
    import ray
    from ray import serve

    spec, _, _ = served
    handle = serve.get_deployment_handle("RaylaneLLMServer:tiny", app_name=spec.name)
    stats = handle.record_autoscaling_stats.remote().result()
    assert set(stats) == {"num_requests_waiting", "num_requests_running", "kv_cache_usage"}
    assert 0.0 <= stats["kv_cache_usage"] <= 1.0
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "num_requests_waiting", "kv_cache_usage_perc"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(3)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"metrics not exported: {missing}"
    assert "time_to_first_token_seconds_bucket" in text  # a histogram, not a gauge


@pytest.mark.timeout(300)
def test_dashboard_serving_panels_query_exported_metrics(served, ray_local):
    """Every metric the Grafana dashboard's serving panels query is in a real scrape of this
    node's Ray metrics port (the requests of the tests above filled the histograms)."""
    from tests.dashboard import assert_rows_exported, label_values, metrics_url

    spec, _, c = served
    r = c.post("/v1/completions", headers=auth(), json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert_rows_exported("Serving")
    # The per-app panels join vLLM's ReplicaId to the application of Serve's replica health gauge.
    url = metrics_url()
    engines = label_values(url, "ray_vllm_kv_cache_usage_perc", "ReplicaId", model_name="tiny")
    replicas = label_values(url, "ray_serve_deployment_replica_healthy", "replica", application=spec.name)
    assert engines and engines <= replicas, (engines, replicas)


def _engine_replica_actors(app_name: str) -> list[str]:
    """Names of the live engine replica actors (``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app_name}#RaylaneLLMServer:tiny#")]


def test_engine_and_replica_run_at_normal_cpu_priority(served):
    """Ray starts workers at nice 15; the replica (the HTTP ingress) and its vLLM processes must
    not yield their cores to every other process on the node."""
    import psutil
    import ray

    spec, _, _ = served
    (name,) = _engine_replica_actors(spec.name)
    pid = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    replica = psutil.Process(pid)
    vllm_procs = [p for p in replica.children(recursive=True) if "VLLM" in p.name() or "EngineCore" in p.name()]
    assert vllm_procs, [p.name() for p in replica.children(recursive=True)]
    assert {p.nice() for p in [replica, *vllm_procs]} == {0}
    other = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "SERVE_CONTROLLER_ACTOR"]
    if other:  # the control plane keeps Ray's default, so the test sees a difference
        ctl = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        assert psutil.Process(ray.get(ctl.__ray_call__.remote(lambda self: os.getpid()))).nice() == 15


@pytest.mark.timeout(900)
def test_rendered_config_deploys_with_serve_deploy(served, ray_local, tmp_path):
    """Replaces the app above with the same spec deployed from the rendered config."""
    import yaml
    from ray import serve

    from runtime.serving import build_serve_config

    spec, result, _ = served
    serve.delete(spec.name)
    config = build_serve_config(spec)
    # Serve is already up on this address; keys come from a file, as a Kubernetes secret would.
    host, port = result.url.removeprefix("http://").rsplit(":", 1)
    config["http_options"] = {"host": host, "port": int(port)}
    keys = tmp_path / "api-keys"
    keys.write_text(f"{KEY}\n")
    config["applications"][0]["runtime_env"] = {"env_vars": {"RAYLANE_API_KEYS_FILE": str(keys)}}
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))
    dashboard = ray_local.dashboard_url
    assert dashboard, "the local cluster needs its dashboard for `serve deploy`"
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    out = subprocess.run([serve_cli, "deploy", str(path), "-a", dashboard], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 600
    state = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(spec.name)
        state = str(app.status) if app else None
        if state and state.endswith("RUNNING"):
            break
        assert not (state and state.endswith("DEPLOY_FAILED")), app.message
        time.sleep(2)
    assert state and state.endswith("RUNNING"), state
    with httpx.Client(base_url=result.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", headers=auth(), json={
            "model": "tiny:support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert c.post("/v1/chat/completions", json={"model": "tiny", "messages": []}).status_code == 401


@pytest.mark.timeout(900)
def test_crashed_engine_fails_fast_with_503_and_replica_is_replaced(served):
    """Last (it breaks the app). The replica's engine process dies mid-request (as on an OOM
    kill): the request fails at once with 503, health checks fail, Serve starts a new replica,
    and the new replica serves. (Before raylane's AMX vLLM plugin, runtime.vllm_env, every
    replacement engine on this AMX CPU died with SIGILL on its first step.)"""
    import signal
    import threading

    import psutil
    import ray
    spec, result, _ = served
    (victim,) = _engine_replica_actors(spec.name)
    replica_pid = ray.get(ray.get_actor(victim, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    engines = [p for p in psutil.Process(replica_pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert engines, "no vLLM engine process under the replica"
    outcome: dict = {}

    def long_request():
        t0 = time.monotonic()
        try:
            # 8 choices x 200 tokens: ~200 engine steps, long enough to be cut off even on an idle CPU.
            r = httpx.post(f"{result.url}/v1/completions", headers=auth(), timeout=120, json={
                "model": "tiny", "prompt": "go", "max_tokens": 200, "n": 8, "ignore_eos": True})
            outcome.update(status=r.status_code, text=r.text, headers=dict(r.headers))
        except httpx.HTTPError as e:
            outcome.update(status=None, text=repr(e))
        outcome["seconds"] = time.monotonic() - t0

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.1)
    # A one-token request sent after it returns once the engine has stepped with both: the long
    # request is in the engine now (a fixed sleep let it finish first on an idle machine).
    probe = httpx.post(f"{result.url}/v1/completions", headers=auth(), timeout=60, json={
        "model": "tiny", "prompt": "probe", "max_tokens": 1})
    assert probe.status_code == 200, probe.text
    for p in engines:
        p.send_signal(signal.SIGKILL)
    worker.join(timeout=60)
    assert not worker.is_alive(), "the in-flight request hung after its engine died"
    if outcome.get("status") == 200:
        pytest.fail("the request finished before the engine was killed; the test did not test anything")
    assert outcome["status"] == 503, outcome
    assert "Traceback" not in outcome["text"] and "retry" in outcome["text"]
    assert outcome["headers"].get("x-request-id") and outcome["seconds"] < 30

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        alive = _engine_replica_actors(spec.name)
        if alive and victim not in alive:
            break  # health checks failed and Serve replaced the replica
        time.sleep(2)
    else:
        pytest.fail(f"Serve did not replace the replica with a dead engine within 180 s (replicas: {alive})")
    # The replacement serves.
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"{result.url}/v1/completions", headers=auth(), timeout=60, json={
                "model": "tiny", "prompt": "again", "max_tokens": 8})
            last = (r.status_code, r.text[:300])
            if r.status_code == 200:
                return
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(2)
    pytest.fail(f"the replacement replica never served: {last}")
