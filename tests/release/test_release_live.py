"""Issue 16 on live traffic: real Serve + vLLM (tiny model, one app for the module), a real MLflow
SQLite registry, the rollout controller as a detached Ray actor, and a load generator (threads
using the ``openai`` SDK, no retries) counting every failed request.

- a good adapter (the champion's weights, registered anew) walks 25 -> 50 -> 100 % and is promoted;
- a bad one (other weights: it misses the golden set, whose references are the champion's greedy
  outputs) is rolled back at the first step by the quality probe, ``champion`` unchanged;
- a candidate slowed by the test-only ``$RAYLANE_TEST_CANARY_FAULTS`` knob fails the TTFT check;
- zero failed client requests throughout; each key sees one arm per step (the sticky hash);
  the decision record (registry tags + status) has every step with both arms' numbers.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from tests.conftest import restore_environ
from tests.serve.test_serving_e2e import make_adapter

pytestmark = [pytest.mark.slow, pytest.mark.ray]

KEYS = [f"live-key-{i:02d}" for i in range(40)]
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Ray Serve is"]
MODEL = "tiny:bot"
BASE = "tiny"


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory, storage_root, ray_local):
    import openai
    from ray import serve

    from runtime.registry import Registry
    from runtime.serving import start_serving
    from runtime.serving.canary import FAULTS_ENV
    from runtime.specs import parse_spec

    work = tmp_path_factory.mktemp("release-live")
    faults = work / "faults.json"
    faults.write_text("{}")
    saved = {k: os.environ.get(k) for k in ("RAYLANE_API_KEYS", "RAYLANE_API_KEYS_FILE", FAULTS_ENV)}
    os.environ.update({"RAYLANE_API_KEYS": ",".join(KEYS), FAULTS_ENV: str(faults)})
    os.environ.pop("RAYLANE_API_KEYS_FILE", None)
    champion = make_adapter(tiny_model, work / "champion", seed=0)
    registry = Registry(str(storage_root))
    registry.promote("rel-bot", registry.register("rel-bot", str(champion), params={}, metrics={}, tags={}).version)
    # the base model from the registry too, so a base-model candidate can be released on this app
    registry.promote("rel-base", registry.register("rel-base", str(tiny_model), params={}, metrics={}, tags={}).version)
    spec = parse_spec({
        "kind": "OnlineInference", "name": "rel-chat", "model": "models:/rel-base@champion", "model_id": "tiny",
        "adapters": {"bot": "models:/rel-bot@champion"}, "max_lora_rank": 8, "max_model_len": 256,
        "max_num_seqs": 16, "storage": {"root": str(storage_root)}, "rate_limit": None,
    })
    result = start_serving(spec, port=0, timeout_s=600)
    # The golden set: the champion's greedy outputs, recorded before any rollout.
    with openai.OpenAI(base_url=result.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=120) as c:
        golden = {}
        for model, name in ((MODEL, "golden.jsonl"), (BASE, "golden-base.jsonl")):
            rows = [{"prompt": p, "reference": c.completions.create(model=model, prompt=p, max_tokens=8,
                                                                    temperature=0).choices[0].text} for p in PROMPTS]
            golden[model] = work / name
            golden[model].write_text("".join(json.dumps(r) + "\n" for r in rows))
    golden, golden_base = golden[MODEL], golden[BASE]
    yield {"spec": spec, "url": result.url, "registry": registry, "root": str(storage_root), "work": work,
           "faults": faults, "golden": golden, "golden_base": golden_base, "champion_dir": champion,
           "tiny": tiny_model}
    serve.shutdown()
    restore_environ(saved)


class Load:
    """Threads sending completions for the stable id round-robin over KEYS with the openai SDK
    (no retries): every response's arm and version, every failure."""

    def __init__(self, url: str, threads: int = 4, model: str = MODEL, pause_s: float = 0.0):
        import openai

        self.model, self.pause_s = model, pause_s
        self.clients = {k: openai.OpenAI(base_url=url + "/v1", api_key=k, max_retries=0, timeout=60) for k in KEYS}
        self.served: list[tuple[float, float, str, str, str]] = []  # (sent, answered, key, arm, version)
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def _run(self, i: int, n: int) -> None:
        k = i
        while not self._stop.is_set():
            key = KEYS[k % len(KEYS)]
            k += n
            t0 = time.time()
            try:
                raw = self.clients[key].completions.with_raw_response.create(
                    model=self.model, prompt="Hello there", max_tokens=4, temperature=0)
                raw.parse()
                self.served.append((t0, time.time(), key, raw.headers.get("x-raylane-arm", "-"),
                                    raw.headers.get("x-raylane-model-version", "-")))
            except Exception as e:  # every failure a client would see
                self.failed.append(f"{type(e).__name__}: {e}")
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(90)
        for c in self.clients.values():
            c.close()


def rollout(live, candidate_dir, kill_at_step: int | None = None, **checks):
    """Register ``candidate_dir`` as a new version, start a rollout of it with the quality probe
    and its controller while the load runs; the finished state and the load's record.
    ``kill_at_step``: once the rollout reached that step (0-based), kill the controller actor for
    good (``no_restart``: the replicas' supervisor must start a new one); ``live["kill"]`` then
    holds the state at the kill and the seconds from the kill to the next decision."""
    import ray

    from runtime import release
    from runtime.release.controller import NAMESPACE, actor_name, start_controller, wait_done
    from runtime.specs.serving import RolloutSpec

    reg, spec = live["registry"], live["spec"]
    version = reg.register("rel-bot", str(candidate_dir), params={}, metrics={}, tags={}).version
    cfg = {"adapter": "bot", "steps": [25, 50, 100], "min_step_s": 1.5, "min_requests": 3, "interval_s": 0.5,
           "max_hold_s": 60,
           "checks": {"max_ttft_p95_ratio": 4.0, "max_e2e_p95_ratio": 4.0, "max_error_rate_increase": 0.0,
                      "quality": {"golden_set": str(live["golden"]), "metric": "runtime.release.probe:exact_match",
                                  "max_drop": 0.5, "max_tokens": 8, "endpoint": live["url"]}, **checks}}
    spec = spec.model_copy(update={"rollout": RolloutSpec.model_validate(cfg)})
    t0 = time.monotonic()
    with Load(live["url"]) as load:
        time.sleep(1)
        st = release.rollout_start(spec, candidate=f"models:/rel-bot/{version}")
        controller = start_controller(spec.name, live["root"])
        if kill_at_step is not None:
            live["kill"] = kill_controller(live, spec.name, controller, kill_at_step)
        done = wait_done(spec.name, live["root"], timeout_s=150)
        time.sleep(1)
    # the state is saved before the registry moves: the controller's last turn writes the tags;
    # looked up by name (after a kill, the handle above is the dead actor's)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            running = ray.get(ray.get_actor(actor_name(spec.name), namespace=NAMESPACE).info.remote())["running"]
        except ValueError:  # no controller at all: nothing is writing
            break
        if not running:
            break
        time.sleep(0.3)
    return done, load, version, time.monotonic() - t0, st


def kill_controller(live, name: str, handle, step: int) -> dict:
    """Wait for the rollout to reach ``step``, kill its controller so Ray does not restart it, and
    wait for the next decision (made by the controller a replica's supervisor starts)."""
    import ray

    from runtime import release

    deadline = time.monotonic() + 90
    at = release.rollout_status(name, live["root"])
    while at.step < step and not at.done and time.monotonic() < deadline:
        time.sleep(0.1)
        at = release.rollout_status(name, live["root"])
    assert at.step >= step and not at.done, at.reason
    ray.kill(handle, no_restart=True)
    killed = time.monotonic()
    at = release.rollout_status(name, live["root"])  # the state at the kill (a decision may have just landed)
    while time.monotonic() < deadline + 60:
        now = release.rollout_status(name, live["root"])
        if len(now.history) > len(at.history):
            return {"at": at, "next_decision_s": time.monotonic() - killed}
        time.sleep(0.1)
    raise AssertionError(f"no decision within {time.monotonic() - killed:.0f}s of killing the controller")


def assert_record_complete(live, done, version):
    """Every decision that moved or failed something is a tag on the candidate's version with its
    step, weight, verdict, reason and both arms' numbers (quality included); status agrees."""
    from runtime import release

    tags = live["registry"].get("rel-bot", version).tags
    prefix = f"raylane.rollout.{done.rollout_id}"
    assert tags["raylane.rollout"] == done.rollout_id
    assert (tags[f"{prefix}.state"], tags[f"{prefix}.reason"]) == (done.state, done.reason)
    recorded = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(f"{prefix}.decision.")]
    moved = [h for h in done.history if h["verdict"] != "hold" or h.get("failed")]
    assert recorded == json.loads(json.dumps(moved, default=str)) and recorded
    for h in recorded:
        assert {"step", "weight", "verdict", "reason", "arms"} <= set(h)
        assert h["arms"]["candidate"]["quality"] is not None and h["arms"]["champion"]["quality"] is not None
        assert h["arms"]["candidate"]["requests"] >= 0 and "error_rate" in h["arms"]["champion"]
    status = release.rollout_status(live["spec"].name, live["root"]).summary()
    assert (status["state"], status["reason"], status["decisions"]) == (done.state, done.reason, len(done.history))
    assert status["arms"] == done.history[-1]["arms"]
    assert done.probe_token not in json.dumps(tags) + json.dumps(status)
    return recorded


def assert_sticky(done, load):
    """Each key's arm in a step is the sticky hash's, for every response sent 2.5 s after the
    step began (replicas re-read the state every 2 s) and answered before the next one."""
    from runtime.release.arms import choose_arm
    from runtime.serving.canary import client_id

    starts = [done.started_at] + [h["at"] for h in done.history if h["verdict"] == "advance"]
    ends = starts[1:] + [done.updated_at]
    checked = 0
    for step, (a, b) in enumerate(zip(starts, ends)):
        for sent, answered, key, arm, _ in load.served:
            if a + 2.5 <= sent and answered < b:
                scope = {"headers": [(b"authorization", f"Bearer {key}".encode())]}
                want = choose_arm(client_id(scope, {}), done.rollout_id, step, done.steps[step])
                assert arm == want, (step, key, arm)
                checked += 1
    return checked


@pytest.mark.timeout(300)
def test_good_adapter_walks_every_step_and_is_promoted_through_a_controller_kill(live):
    reg = live["registry"]
    done, load, version, took, _ = rollout(live, live["champion_dir"], kill_at_step=1)
    assert done.state == "promoted", done.reason
    # the killed controller's successor went on from the saved step: nothing repeated or skipped,
    # the decisions before the kill kept as they were
    kill = live.pop("kill")
    assert done.history[:len(kill["at"].history)] == kill["at"].history
    steps = [h["step"] for h in done.history]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}
    assert kill["at"].step in (1, 2)
    assert load.failed == [], load.failed[:3]
    recorded = assert_record_complete(live, done, version)
    assert [(h["step"], h["verdict"]) for h in recorded] == [(0, "advance"), (1, "advance"), (2, "promote")]
    assert all(h["arms"]["candidate"]["quality"] >= 0.5 for h in recorded)
    assert (reg.alias("rel-bot", "champion").version, reg.alias("rel-bot", "previous").version) == (version, 1)
    assert {"champion", "candidate"} <= {arm for *_, arm, _ in load.served}
    assert assert_sticky(done, load) > 0
    print(f"good rollout: {took:.1f}s, {len(load.served)} requests, 0 failed, {len(done.history)} decisions; "
          f"controller killed at step {kill['at'].step + 1}, next decision {kill['next_decision_s']:.1f}s later")


@pytest.mark.timeout(300)
def test_bad_adapter_fails_the_quality_probe_and_is_rolled_back_at_the_first_step(live):
    reg = live["registry"]
    before = reg.alias("rel-bot", "champion").version
    bad = make_adapter(live["tiny"], live["work"] / "bad", seed=1)
    done, load, version, took, _ = rollout(live, bad)
    assert done.state == "rolled_back" and done.step == 0, done.reason
    assert "quality.max_drop" in done.reason
    assert load.failed == [], load.failed[:3]
    assert reg.alias("rel-bot", "champion").version == before
    (h,) = assert_record_complete(live, done, version)
    assert (h["step"], h["verdict"], h["check"]) == (0, "rollback", "quality.max_drop")
    assert h["arms"]["champion"]["quality"] - h["arms"]["candidate"]["quality"] > 0.5
    print(f"bad rollout: {took:.1f}s, {len(load.served)} requests, 0 failed: {done.reason}")


@pytest.mark.timeout(300)
def test_slow_candidate_fails_the_ttft_check(live):
    reg = live["registry"]
    before = reg.alias("rel-bot", "champion").version
    live["faults"].write_text(json.dumps({"delay_s": {"candidate": 2.5}}))
    try:
        done, load, version, took, _ = rollout(live, live["champion_dir"])
    finally:
        live["faults"].write_text("{}")
    assert done.state == "rolled_back" and done.step == 0, done.reason
    assert load.failed == [], load.failed[:3]
    assert reg.alias("rel-bot", "champion").version == before
    (h,) = assert_record_complete(live, done, version)
    assert h["check"] == "max_ttft_p95_ratio", h["reason"]
    assert h["arms"]["candidate"]["ttft_p95_s"] >= 2.5 > h["arms"]["champion"]["ttft_p95_s"]
    assert_sticky(done, load)  # a short step may leave no response to check
    print(f"slow rollout: {took:.1f}s, {len(load.served)} requests, 0 failed: {done.reason}")


@pytest.mark.timeout(720)  # the module's engine start included when it runs alone
def test_base_model_candidate_runs_in_its_own_app_and_is_promoted_with_a_handover(live):
    """The base model released (rollout.adapter: null): version 2 of rel-base (the same weights
    registered anew, so the probe passes) runs in the route-less app rel-chat-candidate while the
    load sends the base id; promoted, the champion app restarts on it and the candidate app goes."""
    import shutil
    import urllib.request

    from ray import serve

    from runtime import release
    from runtime.models import resolve_model
    from runtime.release.controller import start_controller
    from runtime.specs.serving import RolloutSpec

    reg, spec, root = live["registry"], live["spec"], live["root"]
    weights = shutil.copytree(live["tiny"], live["work"] / "base-v2")  # a folder of its own: the path shows it
    version = reg.register("rel-base", str(weights), params={}, metrics={}, tags={}).version
    cfg = {"adapter": None, "steps": [50, 100], "min_step_s": 1.5, "min_requests": 3, "interval_s": 0.5,
           "max_hold_s": 60, "candidate_start_timeout_s": 300,
           "checks": {"max_ttft_p95_ratio": 4.0, "max_e2e_p95_ratio": 4.0, "max_error_rate_increase": 0.0,
                      "quality": {"golden_set": str(live["golden_base"]), "max_drop": 0.5, "max_tokens": 8,
                                  "metric": "runtime.release.probe:exact_match", "endpoint": live["url"]}}}
    spec = spec.model_copy(update={"rollout": RolloutSpec.model_validate(cfg)})
    apps_seen: set[str] = set()

    def wait(pred, timeout_s):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = release.rollout_status(spec.name, root)
            apps_seen.update(serve.status().applications)
            if pred(st):
                return st
            time.sleep(0.3)
        raise AssertionError(f"timed out: {st.reason}")

    t0 = time.monotonic()
    # a lighter load than the adapter tests' (a pause between requests): two engines start on these cores meanwhile
    with Load(live["url"], threads=2, model=BASE, pause_s=0.3) as load:
        time.sleep(1)
        st = release.rollout_start(spec, candidate=f"models:/rel-base/{version}")
        assert st.base and st.engine == "starting" and "api_key" not in json.dumps(st.serve_spec).lower()
        start_controller(spec.name, root)
        live_st = wait(lambda s: s.live or s.done, 300)
        assert live_st.state == "progressing", live_st.reason
        assert "rel-chat-candidate" in serve.status().applications
        done = wait(lambda s: s.done, 150)
        assert done.state == "promoted", done.reason
        final = wait(lambda s: s.engine == "deleted", 300)
        time.sleep(2)
    took = time.monotonic() - t0
    engine = {h["engine"]: h["at"] for h in final.history if h["verdict"] == "engine"}
    promoted_at = next(h["at"] for h in final.history if h["verdict"] == "promote")
    print(f"base rollout: {took:.1f}s, {len(load.served)} requests, {len(load.failed)} failed; candidate engine "
          f"RUNNING {engine['running'] - final.started_at:.1f}s after the start, promotion -> champion app on "
          f"v{version} {engine['handed_over'] - promoted_at:.1f}s, candidate app deleted "
          f"{engine['deleted'] - promoted_at:.1f}s after the promotion")
    assert load.failed == [], load.failed[:3]
    assert {"champion", "candidate"} <= {arm for *_, arm, _ in load.served}
    assert (reg.alias("rel-base", "champion").version, reg.alias("rel-base", "previous").version) == (version, 1)
    assert "rel-chat-candidate" in apps_seen
    deadline = time.monotonic() + 60  # the non-blocking delete
    while "rel-chat-candidate" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "rel-chat-candidate" not in serve.status().applications
    assert list(engine) == ["starting", "running", "redeploying", "handed_over", "deleted"]
    verdicts = [h["verdict"] for h in final.history if h["verdict"] not in ("hold", "engine")]
    assert verdicts == ["advance", "promote"], verdicts
    # the champion app serves the base id itself now, on version 2's weights, with no arm header
    req = urllib.request.Request(live["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        models = {m["id"]: m for m in json.load(r)["data"]}
    assert models[BASE]["root"] == resolve_model(f"models:/rel-base/{version}", root) == str(weights.resolve())
    after = [row for row in load.served if row[0] > engine["deleted"]]
    assert after and all(arm == "-" for *_, arm, _ in after)
