"""Agents on a 3-node Ray cluster (``runtime.testing``): a head with 0 CPUs, the engine's node (4
logical CPUs: the tiny model's engine replica and the ingress replicas) and a node with 0 CPUs
that holds the session's actor; sessions in a real redis-server every node reaches.

One test, in order: a second turn on a session while one runs is a 409 (the lease); the node
holding the session's actor is killed and the next message continues the session (history and
budget usage intact); then the engine's node is killed abruptly and no vLLM engine process
outlives it (issue 13 item 7).
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from runtime.testing import NodeSpec

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

KEY = "mn-agent-key"
CALC = {"name": "calculator", "import_path": "runtime.agents.tools:calculator"}


@pytest.fixture(scope="module")
def local_cluster_nodes():
    # The engine can only land on the first node (the other has no CPU): killing the second never
    # touches the model.
    return [NodeSpec(cpus=4), NodeSpec(cpus=0)]


def engine_processes() -> list[int]:
    """vLLM engine processes on this machine (their process titles start with VLLM::)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if cmd.startswith("VLLM::"):
            pids.append(p.pid)
    return pids


@pytest.fixture(scope="module")
def agent(local_cluster, tiny_model, storage_root, redis_url, tmp_path_factory):
    from runtime.agents import start_agent
    from runtime.ray_env import shutdown_ray
    from runtime.specs import parse_spec

    saved = {k: os.environ.get(k) for k in ("RAYLANE_API_KEYS", "RAYLANE_API_KEYS_FILE")}
    keys_file = tmp_path_factory.mktemp("keys") / "keys"  # every node reads the same file (a mounted secret)
    keys_file.write_text(KEY + "\n")
    keys_file.chmod(0o600)
    os.environ["RAYLANE_API_KEYS_FILE"] = str(keys_file)
    os.environ.pop("RAYLANE_API_KEYS", None)
    baseline = set(engine_processes())
    spec = parse_spec({
        "kind": "Agent", "name": "mnagent", "route_prefix": "/mnagent", "storage": {"root": str(storage_root)},
        "llm": {"model": str(tiny_model), "tool_choice": "required", "max_tool_rounds": 1, "max_tokens": 64,
                "max_model_len": 1024},
        "tools": [CALC], "session_workers": 1, "sessions": {"backend": "redis", "url": redis_url},
    })
    t0 = time.monotonic()
    result = start_agent(spec, address=local_cluster.address, port=0, timeout_s=600)
    print(f"\n[multinode agent] agent and its engine ready in {time.monotonic() - t0:.0f} s at {result.url}")
    try:
        yield result, baseline
    finally:
        shutdown_ray()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _actor_node(name: str) -> str | None:
    """The node of the live session actor ``name``, from the Ray state API."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")], raise_on_missing_output=False)
    return alive[0].node_id if alive else None


def _pin_session_actor(name: str, node_id: str) -> None:
    """Put the session actor on ``node_id``: a 0-CPU actor may land on any node (the head
    included); the test needs it on the node it kills. Same name, options and config as the
    router's own (``SessionRouter.worker``), so the ingress finds it by name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from runtime.agents.worker import NAMESPACE, SessionWorkerImpl, _forwarded_env

    actor = ray.get_actor(name, namespace=NAMESPACE)
    config = ray.get(actor.__ray_call__.remote(lambda self: self.app_config), timeout=60)
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while _actor_node(name) is not None:
        assert time.monotonic() < deadline, "the session actor did not die"
        time.sleep(0.2)
    pinned = ray.remote(SessionWorkerImpl).options(
        name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0, max_concurrency=1000,
        runtime_env={"env_vars": _forwarded_env()},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(config)
    ray.get(pinned.warm.remote(), timeout=120)


def _post(client: httpx.Client, url: str, body: dict, within_s: float = 60) -> httpx.Response:
    """POST, retrying connection errors (a proxy on the lost node) for ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return client.post(url, json=body)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.timeout(900)
def test_losing_the_session_actors_node_loses_nothing_and_no_engine_outlives_its_node(local_cluster, agent):
    result, baseline = agent
    engine_node, session_node = local_cluster.workers
    name = result.actors[0]
    _pin_session_actor(name, session_node.node_id)
    assert _actor_node(name) == session_node.node_id

    client = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    url = result.url
    sid = client.post(f"{url}/sessions").json()["id"]
    messages = f"{url}/sessions/{sid}/messages"

    # Two turns at once on one session: the second is refused while the first runs.
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(r=client.post(messages, json={"content": "What is 6 * 7?"})))
    runner.start()
    deadline = time.monotonic() + 60
    while not client.get(f"{url}/sessions/{sid}").json()["turn_open"]:
        assert time.monotonic() < deadline and runner.is_alive(), "the first turn never started"
        time.sleep(0.05)
    busy = client.post(messages, json={"content": "me too"})
    runner.join(120)
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["type"] == "session_busy" and "a turn is already running" in busy.json()["error"]["message"]
    assert first["r"].status_code == 200, first["r"].text
    before = client.get(f"{url}/sessions/{sid}").json()
    assert before["turn"] == 1 and before["usage"]["steps"] == len(first["r"].json()["steps"]) >= 2
    assert not before["turn_open"]

    # Lose the node that holds the session's actor (SIGKILL of its raylet and processes).
    t0 = time.monotonic()
    local_cluster.kill_node(session_node)
    dead_s = time.monotonic() - t0
    r = _post(client, messages, {"content": "And plus one?"})
    recovered_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["turn"] == 2 and reply["reply"] is not None
    after = client.get(f"{url}/sessions/{sid}").json()
    assert after["messages"][:len(before["messages"])] == before["messages"]  # history intact
    assert after["steps"][:len(before["steps"])] == before["steps"]
    u0, u1 = before["usage"], after["usage"]
    assert u1["steps"] == u0["steps"] + len(reply["steps"]) and u1["tokens"] > u0["tokens"]  # usage carried on
    assert "interrupted" not in after["errors"]
    moved_to = _actor_node(name)
    assert moved_to is not None and moved_to != session_node.node_id
    turn_s = sum(step["seconds"] for step in reply["steps"])
    print(f"\n[multinode agent] session node declared dead in {dead_s:.1f} s; next message answered "
          f"{recovered_s:.1f} s after the kill (its turn itself {turn_s:.1f} s; actor recreated on node "
          f"{moved_to[:8]}); lost: nothing ({u0['steps']} steps, {u0['tokens']} tokens kept)")
    client.close()

    # The engine's node lost abruptly: its vLLM processes go with it.
    engines = set(engine_processes()) - baseline
    assert engines, "no vLLM engine process found while the agent's model was served"
    t1 = time.monotonic()
    local_cluster.kill_node(engine_node)
    local_cluster.wait_for(lambda: not (set(engine_processes()) & engines), "the engine processes to exit", 30)
    print(f"[multinode agent] {len(engines)} vLLM engine processes gone {time.monotonic() - t1:.1f} s after "
          "their node was killed")
