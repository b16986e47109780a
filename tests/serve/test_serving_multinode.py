"""Online inference on a 3-node Ray cluster (``runtime.testing``): a head with 0 CPUs and two
worker nodes with 1 logical CPU each, so each hosts exactly one engine replica (a 1-CPU bundle) of
the tiny model, behind every node's HAProxy; clients are the real openai SDK.

In order (one app for the module): both replicas bind every interface and the per-key rate limit
holds for the two together (the shared store); a replica's node is lost under steady load and a
replacement node brings the second replica back; an engine that stalls (SIGSTOP) fails its health
check through the request-path probe and its replica is replaced while the survivor serves.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from runtime.testing import NodeSpec

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]

CLIENTS = 4
KEYS = [f"mn-client-{i}" for i in range(CLIENTS)]
LIMITED = "mn-limited"
RPM, BURST = 300, 20  # per key: 5 requests/s; a client sending one request at a time stays under it
HANG_S = 60  # a request that takes longer than this counts as a hang


@pytest.fixture(scope="module")
def local_cluster_nodes():
    return [NodeSpec(cpus=1), NodeSpec(cpus=1)]


@pytest.fixture(scope="module")
def served(local_cluster, tiny_model, storage_root, tmp_path_factory):
    from ray import serve

    from runtime.ray_env import shutdown_ray
    from runtime.serving import start_serving
    from runtime.specs import parse_spec

    saved = {k: os.environ.get(k) for k in ("RAYLANE_API_KEYS", "RAYLANE_API_KEYS_FILE")}
    # A multi-node cluster never gets key values from the driver: the nodes read a keys file that
    # each of them has (here the same machine's; on a cluster a mounted secret).
    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    keys_file.write_text("\n".join([*KEYS, LIMITED]) + "\n")
    keys_file.chmod(0o600)
    os.environ["RAYLANE_API_KEYS_FILE"] = str(keys_file)
    os.environ.pop("RAYLANE_API_KEYS", None)
    spec = parse_spec({
        "kind": "OnlineInference", "name": "mn-chat", "model": str(tiny_model), "model_id": "tiny",
        "max_model_len": 256, "max_num_seqs": 8, "storage": {"root": str(storage_root)},
        "resources": {"cpus_per_worker": 1}, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "rate_limit": {"requests_per_minute": RPM, "burst": BURST},
    })
    t0 = time.monotonic()
    result = start_serving(spec, address=local_cluster.address, port=0, timeout_s=600)
    print(f"\n[multinode serve] 2 replicas on 2 nodes ready in {time.monotonic() - t0:.0f} s at {result.url}")
    try:
        yield spec, result
    finally:
        serve.shutdown()
        shutdown_ray()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _replicas(app: str) -> dict[str, str]:
    """Live engine replica actor name -> the Ray node it runs on."""
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#"):
            try:
                out[a["name"]] = ray.get(ray.get_actor(a["name"], namespace="serve").__ray_call__.remote(
                    lambda self: __import__("ray").get_runtime_context().get_node_id()), timeout=10)
            except Exception:  # a replica on a node that just died
                pass
    return out


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


class Load:
    """CLIENTS openai-SDK clients, each with its own key, one chat request at a time."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[tuple[float, float, str]] = []  # (start, seconds, outcome)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in KEYS]

    def _run(self, key: str):
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=HANG_S, max_retries=0)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
                outcome = "ok"
            except openai.APITimeoutError:
                outcome = "hung"
            except openai.APIStatusError as e:
                outcome = f"{e.status_code}" + ("+retry-after" if e.response.headers.get("retry-after") else "")
            except openai.APIConnectionError:
                outcome = "connection-error"
            self.results.append((t0, time.monotonic() - t0, outcome))
            if outcome != "ok":
                time.sleep(0.5)  # a real client backs off (Retry-After: 1)
            else:
                time.sleep(0.3)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(HANG_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client is still waiting on a request"

    def between(self, t0: float, t1: float = float("inf")) -> Counter:
        return Counter(o for s, _, o in self.results if t0 <= s < t1)


def test_replicas_on_two_nodes_bind_every_interface_and_share_the_rate_limit(served, local_cluster):
    import psutil
    import ray

    spec, result = served
    replicas = _replicas(spec.name)
    assert len(replicas) == 2 and len(set(replicas.values())) == 2, replicas  # one per worker node
    assert not result.url.startswith("http://127.0.0.1"), result.url  # bound on 0.0.0.0, the URL names the head
    name = next(iter(replicas))
    pid = ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    from ray.serve._private.constants import RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT as HI
    from ray.serve._private.constants import RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT as LO

    http = {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and LO <= c.laddr.port <= HI}
    assert http == {"0.0.0.0"}, http  # HAProxy on the other node can reach this replica

    # One key, 64 cheap requests at once through both nodes' HAProxy to both replicas: the shared
    # bucket admits BURST + RPM x elapsed in total (a per-replica bucket would admit ~2 x BURST).
    def get(_):
        return httpx.get(f"{result.url}/v1/models", headers={"Authorization": f"Bearer {LIMITED}"}, timeout=30)

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = Counter(r.status_code for r in pool.map(get, range(64)))
    elapsed = time.monotonic() - t0
    allowed = BURST + RPM / 60 * elapsed
    print(f"[multinode serve] rate limit: {codes[200]} of 64 admitted in {elapsed:.1f} s "
          f"(limit {allowed:.1f} for both replicas together; {dict(codes)})")
    assert set(codes) == {200, 429}, codes
    assert BURST - 2 <= codes[200] <= allowed + 1, (codes, elapsed)
    store = ray.get_actor(f"raylane-ratelimit-{spec.name}", namespace="raylane")
    head = ray.get(store.__ray_call__.remote(lambda self: __import__("ray").get_runtime_context().get_node_id()))
    assert head not in {w.node_id for w in local_cluster.workers}  # the counters survive any worker node


@pytest.mark.timeout(600)
def test_lost_node_fails_only_in_flight_requests_and_the_replica_comes_back(served, local_cluster):
    spec, result = served
    with Load(result.url) as load:
        time.sleep(8)
        t_kill = time.monotonic()
        victim = local_cluster.worker(next(iter(_replicas(spec.name).values())))
        local_cluster.kill_node(victim)
        t_dead = time.monotonic()
        time.sleep(15)
        local_cluster.add_node(NodeSpec(cpus=1))
        local_cluster.wait_for(lambda: _running_replicas(spec.name) == 2, "2 running replicas again", 300, 1.0)
        t_back = time.monotonic()
        time.sleep(5)
    before, after = load.between(0, t_kill), load.between(t_kill)
    survivor = load.between(t_dead + 10, t_back)
    print(f"[multinode serve] node loss: before {dict(before)}; after the kill {dict(after)}; "
          f"on the survivor alone {dict(survivor)}; node declared dead {t_dead - t_kill:.1f} s after the kill, "
          f"2 replicas running {t_back - t_kill:.0f} s after it; "
          f"slowest request {max(d for _, d, _ in load.results):.1f} s")
    assert set(before) == {"ok"}, before
    assert load.between(0)["hung"] == 0
    failures = {o: n for o, n in after.items() if o != "ok"}
    # Lost: at most the requests in flight on the dead node (one per client), each a 503 with
    # Retry-After or a dropped connection; never a 404 or 500.
    assert set(failures) <= {"503+retry-after", "connection-error"}, failures
    assert sum(failures.values()) <= 2 * CLIENTS, failures
    assert survivor["ok"] >= CLIENTS, survivor  # new requests went to the survivor


@pytest.mark.timeout(400)
def test_stalled_engine_fails_its_health_check_and_is_replaced(served):
    import psutil
    import ray

    spec, result = served
    replicas = _replicas(spec.name)
    victim = next(iter(replicas))
    pid = ray.get(ray.get_actor(victim, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))
    engines = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in p.name() + " ".join(p.cmdline())]
    assert engines, "no vLLM engine process under the replica"
    with Load(result.url) as load:
        time.sleep(3)
        t_stop = time.monotonic()
        for p in engines:
            p.send_signal(signal.SIGSTOP)  # alive (Serve's ping answers) but makes no progress
        try:
            local_cluster_wait(lambda: victim not in _replicas(spec.name), 180)
        finally:
            for p in engines:
                if p.is_running():
                    p.send_signal(signal.SIGCONT)
        t_replaced = time.monotonic()
        time.sleep(5)
    after = load.between(t_stop)
    print(f"[multinode serve] stalled engine: replica replaced {t_replaced - t_stop:.0f} s after SIGSTOP; "
          f"requests meanwhile {dict(after)}; slowest {max(d for _, d, _ in load.results):.1f} s")
    assert after["hung"] == 0
    assert set(after) <= {"ok", "503+retry-after", "connection-error"}, after
    assert load.between(t_replaced)["ok"] >= 1  # requests go on (the survivor serves)


def local_cluster_wait(condition, timeout_s: float):
    from runtime.testing import LocalCluster

    LocalCluster.wait_for(condition, "the stalled replica to be replaced", timeout_s, 1.0)
