"""End-to-end on Ray: the agent's Serve ingress and session actors against a real vLLM server
(tiny model, guided JSON). Sessions over HTTP with auth, retrieval built by Ray Data, a tool
timeout, the Redis store, and killing the session actor or the Serve replica mid-session. The
hardening: sessions owned by their key, server-made ids, the per-key quota, the guard's rate
limit and body cap, max_message_chars, and side-effecting tools behind allow_tools."""

from __future__ import annotations

import json
import os
import sys
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

KEY = "agent-test-key"
KEY_B, KEY_QUOTA, KEY_RATE = "agent-key-b", "agent-key-quota", "agent-key-rate"  # own rate buckets and quotas
CALC = {"name": "calculator", "import_path": "runtime.agents.tools:calculator"}
SLOW = {"name": "slow_lookup", "import_path": "examples.tools:slow_lookup", "timeout_s": 1, "retries": 1}
MCP_SERVER = os.path.join(os.path.dirname(__file__), "mcp_server.py")


def mcp_stdio(notes: str, allow: list[str]) -> dict:
    """The test MCP server over stdio: each session actor starts its own."""
    return {"name": "mcp", "transport": "stdio", "command": sys.executable, "args": [MCP_SERVER],
            "env": {"MCP_TEST_NOTES": notes}, "allow_tools": allow}


def append_tool(path, **flags) -> dict:
    """A side-effecting tool that appends "KEY<tab>TEXT" to ``path`` (the file is a const in its schema)."""
    from examples.tools import append_line_parameters

    return {"name": "append", "import_path": "examples.tools:append_line", "side_effects": True,
            "parameters": append_line_parameters(str(path)), **flags}


def agent_spec(name, vllm_url, storage_root, **patch):
    from runtime.specs import parse_spec

    llm = {"url": vllm_url, "tool_choice": "required", "max_tool_rounds": 2, **patch.pop("llm", {})}
    return parse_spec({"kind": "Agent", "name": name, "route_prefix": f"/{name}", "llm": llm,
                       "storage": {"root": str(storage_root)}, **patch})


@pytest.fixture(scope="module")
def agents(vllm_url, storage_root, redis_url, ray_local):
    from ray import serve

    from runtime.agents import start_agent, stop_agent

    saved = {k: os.environ.get(k) for k in ("RAYLANE_API_KEYS", "RAYLANE_API_KEYS_FILE")}
    os.environ["RAYLANE_API_KEYS"] = f"{KEY},{KEY_B},{KEY_QUOTA},{KEY_RATE}"
    os.environ.pop("RAYLANE_API_KEYS_FILE", None)
    specs = {
        "main": agent_spec("main", vllm_url, storage_root, tools=[CALC]),
        "slow": agent_spec("slow", vllm_url, storage_root, tools=[SLOW], llm={"max_tool_rounds": 1},
                           budgets={"max_tool_failures": 0}),
        "search": agent_spec("search", vllm_url, storage_root, retrieval={"corpus": "sample", "min_score": 0.99},
                           sessions={"backend": "redis", "url": redis_url}, llm={"max_tool_rounds": 1}),
        # Tight limits, each test on it with its own key: <= 3 sessions and <= 10 quick requests a key.
        "guarded": agent_spec("guarded", vllm_url, storage_root, tools=[{**CALC, "side_effects": True}],
                              llm={"max_tool_rounds": 1}, rate_limit={"requests_per_minute": 6, "burst": 10},
                              max_message_chars=200, max_sessions_per_key=3),
        "mcp": agent_spec("mcp", vllm_url, storage_root, mcp_servers=[mcp_stdio(str(storage_root / "mcp-notes.txt"),
                                                                                ["upper", "note"])]),
        "approve": agent_spec("approve", vllm_url, storage_root, session_workers=1, llm={"max_tool_rounds": 1},
                              tools=[append_tool(storage_root / "approved.txt", requires_approval=True)]),
    }
    from runtime.serving.deploy import free_port

    port = free_port("127.0.0.1")
    results = {k: start_agent(s, port=port, timeout_s=300) for k, s in specs.items()}
    client = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield specs, results, client
    client.close()
    stop_agent(*results.values())
    serve.shutdown()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def new_session(client, url) -> str:
    r = client.post(f"{url}/sessions")
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.mark.timeout(900)
def test_session_over_http_with_auth_and_full_trace(agents):
    specs, results, client = agents
    url = results["main"].url
    assert httpx.post(f"{url}/sessions").status_code == 401
    assert httpx.post(f"{url}/sessions", headers={"Authorization": "Bearer wrong"}).status_code == 401
    sid = new_session(client, url)
    r = client.post(f"{url}/sessions/{sid}/messages", json={"content": "What is 6 * 7?"})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["session_id"] == sid and reply["status"] == "active" and reply["reply"]
    assert [s["action"] for s in reply["steps"]] == ["tool", "tool", "answer"]
    got = client.get(f"{url}/sessions/{sid}").json()
    assert got["steps"] == reply["steps"]  # one record per step, persisted
    assert [m["role"] for m in got["messages"]][0] == "user" and got["messages"][-1]["role"] == "assistant"
    for step in got["steps"]:
        assert len(step["trace_id"]) == 32 and int(step["trace_id"], 16) != 0  # real spans in the actor
        assert step["llm"]["tokens_in"] > 0
    assert got["steps"][0]["tool"]["ok"] is True
    stats = client.get(f"{url}/stats").json()
    assert stats["tool_calls:calculator:ok"] >= 2 and stats["tool_success_rate"] == 1.0
    assert client.get(f"{url}/sessions/nope").status_code == 404
    assert client.post(f"{url}/sessions/{sid}/messages", json={"content": ""}).status_code == 400


@pytest.mark.timeout(900)
def test_streamed_steps(agents):
    specs, results, client = agents
    url = results["main"].url
    sid = new_session(client, url)
    with client.stream("POST", f"{url}/sessions/{sid}/messages", json={"content": "2+2?", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert [e["type"] for e in events] == ["step", "step", "step", "reply"]
    assert [e["n"] for e in events[:3]] == [1, 2, 3] and events[-1]["reply"]


@pytest.mark.timeout(900)
def test_tool_timeout_cancels_retries_and_ends_on_the_failure_budget(agents):
    specs, results, client = agents
    url = results["slow"].url
    sid = new_session(client, url)
    t0 = time.monotonic()
    reply = client.post(f"{url}/sessions/{sid}/messages", json={"content": "look up x"}).json()
    assert time.monotonic() - t0 < 25  # two 1 s attempts, not the tool's 30 s sleep
    step = reply["steps"][0]
    assert step["tool"]["name"] == "slow_lookup" and step["tool"]["timed_out"] is True
    assert step["tool"]["attempts"] == 2 and "timeout after 1 s" in step["tool"]["error"]
    assert reply["status"] == "ended" and reply["end_reason"] == "max_tool_failures"
    got = client.get(f"{url}/sessions/{sid}").json()
    assert got["errors"]["tool_timeout:slow_lookup"] == 1 and got["errors"]["budget:max_tool_failures"] == 1
    ended = client.post(f"{url}/sessions/{sid}/messages", json={"content": "again"})
    assert ended.status_code == 409 and ended.json()["end_reason"] == "max_tool_failures"


@pytest.mark.timeout(900)
def test_empty_retrieval_reaches_model_and_trace_with_redis_store(agents, redis_url):
    from runtime.agents.store import RedisStore

    specs, results, client = agents
    url = results["search"].url
    sid = new_session(client, url)
    reply = client.post(f"{url}/sessions/{sid}/messages", json={"content": "What does KubeRay do?"}).json()
    first = reply["steps"][0]["tool"]
    assert first["name"] == "retrieve" and first["kind"] == "retrieval"
    assert first["ok"] and first["hits"] == 0 and first["empty"] is True
    stored = RedisStore(redis_url, prefix="raylane:search:session").load(sid)  # the Redis store holds it
    assert stored["steps"] == reply["steps"] and stored["errors"]["retrieval_empty"] >= 1
    observation = next(m for m in stored["messages"] if m["role"] == "tool")
    assert observation["content"].startswith("[retrieve] no results for")


@pytest.mark.timeout(300)
def test_dashboard_agent_panels_query_exported_metrics(agents):
    """After the sessions above (a tool timeout that ended a session on its failure budget among
    them), the agents' metrics are on the node's metrics port under the dashboard's names."""
    from tests.dashboard import assert_rows_exported, metrics_url, sample_values

    assert_rows_exported("Agents")
    url, deadline = metrics_url(), time.monotonic() + 30
    while True:
        failed = sum(sample_values(url, "ray_raylane_agent_tool_calls_total", app="slow", ok="false"))
        breached = sum(sample_values(url, "ray_raylane_agent_budget_breaches_total", app="slow",
                                     budget="max_tool_failures"))
        if (failed and breached) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert failed >= 1 and breached >= 1, (failed, breached)


def test_index_built_by_ray_data_answers_queries(agents):
    from runtime.agents.config import index_uri
    from runtime.agents.retrieval import read_manifest, retrieve

    specs, _, _ = agents
    uri = index_uri(specs["search"])
    manifest = read_manifest(uri)
    assert manifest["chunks"] == 8 and manifest["embedding"] == "hashed-ngram-v1"
    hits = retrieve(query="How does Ray Serve autoscaling route HTTP requests?", _index=uri, _top_k=2)["hits"]
    assert hits[0]["id"] == "ray-serve#0"
    assert retrieve(query="zzzz qqqq", _index=uri, _min_score=0.5)["hits"] == []


def _kill_session_actor(spec, sid):
    import ray

    from runtime.agents.runner import prepare_app_config
    from runtime.agents.worker import NAMESPACE, SessionRouter

    router = SessionRouter(prepare_app_config(spec))
    ray.kill(ray.get_actor(router.names[router.index(sid)], namespace=NAMESPACE), no_restart=True)


@pytest.mark.timeout(900)
def test_killed_session_actor_mid_turn_then_resume_loses_nothing(agents):
    specs, results, client = agents
    url = results["main"].url
    sid = new_session(client, url)
    first = client.post(f"{url}/sessions/{sid}/messages", json={"content": "What is 1+1?"}).json()
    assert first["reply"]
    events = []
    with client.stream("POST", f"{url}/sessions/{sid}/messages", json={"content": "And 2+2?", "stream": True}) as r:
        lines = r.iter_lines()
        try:
            for line in lines:
                if line:
                    events.append(json.loads(line))
                    if len(events) == 1:
                        _kill_session_actor(specs["main"], sid)  # mid-turn: step 1 saved, more to come
        except httpx.HTTPError:
            pass  # the stream breaks with the actor
    assert events and events[0]["type"] == "step" and events[-1]["type"] != "reply"
    mid = client.get(f"{url}/sessions/{sid}").json()
    assert len(mid["steps"]) >= 4  # turn 1's three steps and at least the first of turn 2
    third = client.post(f"{url}/sessions/{sid}/messages", json={"content": "And 3+3?"})
    assert third.status_code == 200, third.text
    after = client.get(f"{url}/sessions/{sid}").json()
    assert after["turn"] == 3 and after["errors"]["interrupted"] == 1 and after["resumed"] == 1
    assert after["steps"][: len(mid["steps"])] == mid["steps"]  # nothing lost, nothing rewritten
    users = [m["content"] for m in after["messages"] if m["role"] == "user"]
    assert users == ["What is 1+1?", "And 2+2?", "And 3+3?"]  # nothing duplicated
    assert [s["n"] for s in after["steps"]] == list(range(1, len(after["steps"]) + 1))


@pytest.mark.timeout(900)
def test_killed_serve_replica_then_next_message_resumes(agents):
    import ray

    specs, results, client = agents
    url = results["main"].url
    sid = new_session(client, url)
    assert client.post(f"{url}/sessions/{sid}/messages", json={"content": "5*5?"}).json()["reply"]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "main" in a["name"] and "AgentIngress" in a["name"]]
    assert replicas
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    while True:  # Serve replaces the replica; the session lives in the store and its actor
        try:
            r = client.post(f"{url}/sessions/{sid}/messages", json={"content": "and 6*6?"})
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "replica did not come back"
        time.sleep(1)
    got = client.get(f"{url}/sessions/{sid}").json()
    assert got["turn"] == 2 and len(got["steps"]) == 6
    assert [m["content"] for m in got["messages"] if m["role"] == "user"] == ["5*5?", "and 6*6?"]


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _error(r, status: int, kind: str, words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]  # the guard's OpenAI-style body, from the guard and the routes alike
    assert err["type"] == kind and words in err["message"], err


@pytest.mark.timeout(900)
def test_sessions_belong_to_the_key_that_created_them(agents):
    _, results, client = agents
    url = results["main"].url
    sid = new_session(client, url)
    assert client.post(f"{url}/sessions/{sid}/messages", json={"content": "What is 2+2?"}).status_code == 200
    b = httpx.Client(headers=_as(KEY_B), timeout=120)
    _error(b.get(f"{url}/sessions/{sid}"), 404, "not_found_error", "no session")
    _error(b.post(f"{url}/sessions/{sid}/messages", json={"content": "hi"}), 404, "not_found_error", "no session")
    _error(b.post(f"{url}/sessions/{sid}/messages", json={"content": "hi", "stream": True}), 404, "not_found_error",
           "no session")
    _error(b.delete(f"{url}/sessions/{sid}"), 404, "not_found_error", "no session")
    mine = client.get(f"{url}/sessions/{sid}").json()
    assert mine["turn"] == 1 and [m["content"] for m in mine["messages"] if m["role"] == "user"] == ["What is 2+2?"]
    assert "owner" not in mine  # the key's digest stays in the store
    other = new_session(b, url)
    _error(client.get(f"{url}/sessions/{other}"), 404, "not_found_error", "no session")
    # ids: made by the server, validated on every route
    assert len(sid) == 32 and sid != other
    _error(client.post(f"{url}/sessions", json={"id": "alice"}), 400, "invalid_request_error", "made by the server")
    for bad in ["bad$id", "a" * 65, "ids:x"]:
        _error(client.get(f"{url}/sessions/{bad}"), 400, "invalid_request_error", "1 to 64 letters")
        _error(client.post(f"{url}/sessions/{bad}/messages", json={"content": "hi"}), 400, "invalid_request_error",
               "1 to 64 letters")
    assert client.delete(f"{url}/sessions/{sid}").json() == {"id": sid, "deleted": True}
    _error(client.get(f"{url}/sessions/{sid}"), 404, "not_found_error", "no session")
    b.close()


@pytest.mark.timeout(900)
def test_per_key_session_quota(agents):
    _, results, _ = agents
    url = results["guarded"].url
    q = httpx.Client(headers=_as(KEY_QUOTA), timeout=120)
    ids = [new_session(q, url) for _ in range(3)]
    _error(q.post(f"{url}/sessions"), 429, "session_quota_exceeded", "already holds 3 sessions (max_sessions_per_key)")
    other = httpx.Client(headers=_as(KEY_B), timeout=120)
    assert other.post(f"{url}/sessions").status_code == 200  # the quota is per key
    assert q.delete(f"{url}/sessions/{ids[0]}").status_code == 200
    assert q.post(f"{url}/sessions").status_code == 200  # a deleted session frees its place
    q.close()
    other.close()


@pytest.mark.timeout(900)
def test_rate_limit_per_key(agents):
    _, results, client = agents
    url = results["guarded"].url
    r = httpx.Client(headers=_as(KEY_RATE), timeout=120)
    codes = [r.get(f"{url}/sessions/nope").status_code for _ in range(14)]
    assert codes[:8] == [404] * 8 and codes[-1] == 429, codes  # burst 10, refill 0.1/s
    limited = r.get(f"{url}/sessions/nope")
    _error(limited, 429, "rate_limit_error", "rate limit exceeded")
    assert int(limited.headers["Retry-After"]) >= 1
    assert r.post(f"{url}/sessions").status_code == 429  # every route, creating sessions too
    assert client.get(f"{url}/sessions/nope").status_code == 404  # another key is not limited
    r.close()


@pytest.mark.timeout(900)
def test_message_length_and_body_size_caps(agents):
    from runtime.serving.guard import MAX_BODY_BYTES

    _, results, _ = agents
    url = results["guarded"].url
    b = httpx.Client(headers=_as(KEY_B), timeout=120)
    sid = new_session(b, url)
    _error(b.post(f"{url}/sessions/{sid}/messages", json={"content": "x" * 201}), 400, "invalid_request_error",
           "201 characters, over this agent's limit of 200 (max_message_chars)")
    big = json.dumps({"content": "x" * (MAX_BODY_BYTES + 1024)})
    r = b.post(f"{url}/sessions/{sid}/messages", content=big, headers={"content-type": "application/json"})
    _error(r, 413, "invalid_request_error", "request body over")
    got = b.get(f"{url}/sessions/{sid}").json()
    assert got["turn"] == 0 and got["messages"] == []  # neither reached the session
    b.close()


@pytest.mark.timeout(900)
def test_side_effecting_tool_runs_only_where_the_session_allows_it(agents):
    _, results, client = agents
    url = results["guarded"].url
    _error(client.post(f"{url}/sessions", json={"allow_tools": ["rm_rf"]}), 400, "invalid_request_error",
           "unknown tool(s) rm_rf")
    denied = new_session(client, url)
    reply = client.post(f"{url}/sessions/{denied}/messages", json={"content": "What is 6 * 7?"}).json()
    first = reply["steps"][0]
    assert first["action"] == "refused" and first["tool"]["name"] == "calculator"
    assert 'allow_tools": ["calculator"]' in first["error"]
    assert reply["usage"]["tool_calls"] == 0 and [s["action"] for s in reply["steps"]] == ["refused", "answer"]
    got = client.get(f"{url}/sessions/{denied}").json()
    assert got["errors"]["tool_refused:calculator"] == 1
    assert any(m["role"] == "feedback" and m["content"].startswith("Refused:") for m in got["messages"])
    r = client.post(f"{url}/sessions", json={"allow_tools": ["calculator"]})
    assert r.status_code == 200 and r.json()["allowed_tools"] == ["calculator"]
    allowed = r.json()["id"]
    reply = client.post(f"{url}/sessions/{allowed}/messages", json={"content": "What is 6 * 7?"}).json()
    assert reply["steps"][0]["action"] == "tool" and reply["steps"][0]["tool"]["ok"] is True
    assert reply["usage"]["tool_calls"] == 1


@pytest.mark.timeout(900)
def test_mcp_tools_from_a_stdio_server_beside_each_session_actor(agents, storage_root):
    _, results, client = agents
    url = results["mcp"].url
    assert results["mcp"].tools == ["mcp__upper", "mcp__note"]
    r = client.post(f"{url}/sessions", json={"allow_tools": ["mcp__note"]})  # note has no readOnlyHint
    assert r.status_code == 200 and r.json()["allowed_tools"] == ["mcp__note"]
    sid = r.json()["id"]
    reply = client.post(f"{url}/sessions/{sid}/messages", json={"content": "Note that it rains."}).json()
    calls = [s["tool"] for s in reply["steps"] if s["action"] == "tool"]
    assert len(calls) == 2 and [s["action"] for s in reply["steps"]][-1] == "answer"
    notes = storage_root / "mcp-notes.txt"
    for call in calls:
        assert call["ok"] is True and call["name"] in ("mcp__upper", "mcp__note"), call
        text = call["arguments"]["text"]
        assert call["result"] == (text.upper() if call["name"] == "mcp__upper" else f"noted: {text}")
        if call["name"] == "mcp__note":  # the server the session actor started wrote it (the spec's env)
            assert f"{text}\n" in notes.read_text()
    stats = client.get(f"{url}/stats").json()
    assert sum(v for k, v in stats.items() if k.startswith("tool_calls:mcp__") and k.endswith(":ok")) >= 2


def _sdk(url: str, key: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.timeout(900)
def test_responses_api_with_the_openai_sdk(agents):
    """POST /v1/responses from the official openai SDK: a session turn per response, continued by
    previous_response_id, streamed, owned by its key, with the guard's body checks."""
    import openai

    from runtime.agents.tools import calculator

    _, results, client = agents
    url = results["main"].url
    sdk = _sdk(url, KEY)
    t0 = time.monotonic()
    first = sdk.responses.create(model="main", input="What is 6 * 7?")
    assert first.status == "completed" and first.output_text, first
    assert [i.type for i in first.output] == ["function_call", "function_call_output"] * 2 + ["message"]
    for call, out in (first.output[0:2], first.output[2:4]):  # the tools ran on the server
        assert call.name == "calculator" and out.call_id == call.call_id
        assert out.output == calculator(**json.loads(call.arguments))
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    sid = first.model_extra["session_id"]
    assert first.id == f"resp_{sid}_1"

    second = sdk.responses.create(model="main", input="And 7 * 8?", previous_response_id=first.id,
                                  instructions="Answer with the number only.")
    assert second.status == "completed" and second.previous_response_id == first.id and second.id == f"resp_{sid}_2"
    history = client.get(f"{url}/sessions/{sid}").json()  # one session: the agent saw the earlier turn
    assert history["turn"] == 2
    assert [m["content"] for m in history["messages"] if m["role"] == "user"] == ["What is 6 * 7?", "And 7 * 8?"]
    turn1, turn2 = ([s for s in history["steps"] if s["turn"] == t] for t in (1, 2))
    assert turn2[0]["llm"]["tokens_in"] > turn1[-1]["llm"]["tokens_in"]  # its prompt held all of turn 1
    assert sum(s["llm"]["tokens_in"] for s in turn2) == second.usage.input_tokens

    # A new conversation, streamed (a third turn of the first would pass the tiny model's 2048-token context)
    with sdk.responses.stream(model="main", input="What is 2+2?") as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed", events[-1]
    assert types.count("response.output_item.done") == 5 and "response.output_text.delta" in types
    final = stream.get_final_response()
    assert final.output_text and final.id.endswith("_1") and final.id != first.id
    stored = sdk.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and [i.id for i in stored.output] == [i.id for i in final.output]

    # max_output_tokens caps the turn (tool_choice required: the first call is a tool call, after it
    # fewer than 16 tokens are left); store: false deletes the session once the response is made
    capped = sdk.responses.create(model="main", input="What is 3 * 3?", max_output_tokens=16, store=False)
    assert capped.status == "incomplete" and capped.incomplete_details.reason == "max_output_tokens", capped
    assert 0 < capped.usage.output_tokens <= 16 and capped.max_output_tokens == 16
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(capped.id)
    _error(client.get(f"{url}/sessions/{capped.model_extra['session_id']}"), 404, "not_found_error", "no session")

    other = _sdk(url, KEY_B)  # another key: the response ids are not its own
    for attempt in (lambda: other.responses.create(model="main", input="hi", previous_response_id=second.id),
                    lambda: other.responses.retrieve(second.id)):
        with pytest.raises(openai.NotFoundError, match="no response"):
            attempt()
    with pytest.raises(openai.BadRequestError, match="not the latest response") as e:
        sdk.responses.create(model="main", input="fork", previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError, match="unknown or unsupported field") as e:
        sdk.responses.create(model="main", input="hi", temperature=0.2)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="serves the agent 'main'"):
        sdk.responses.create(model="gpt-4o", input="hi")
    with pytest.raises(openai.AuthenticationError):
        _sdk(url, "wrong").responses.create(model="main", input="hi")
    assert client.get(f"{url}/sessions/{sid}").json()["turn"] == 2  # none of those reached the session
    for done in (sid, final.model_extra["session_id"]):
        assert client.delete(f"{url}/sessions/{done}").status_code == 200
    print(f"responses e2e: {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(300)
def test_an_mcp_tool_the_server_lacks_fails_the_agents_start(vllm_url, storage_root, ray_local):
    from runtime.agents.runner import prepare_app_config, warm_workers
    from runtime.agents.worker import SessionRouter
    from runtime.errors import RaylaneError

    spec = agent_spec("mcpbad", vllm_url, storage_root, auth="none",
                      mcp_servers=[mcp_stdio(str(storage_root / "unused.txt"), ["upper", "format_disk"])])
    router = SessionRouter(prepare_app_config(spec))
    try:
        with pytest.raises(RaylaneError) as e:
            warm_workers(router)
    finally:
        router.kill_actors()
    assert "mcp_servers[0] (mcp).allow_tools: the server does not offer format_disk; it offers: add," in str(e.value)


def _effects(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(900)
def test_approval_pauses_the_session_survives_restarts_and_resumes(agents, storage_root):
    import ray

    specs, results, client = agents
    url = results["approve"].url
    effects = storage_root / "approved.txt"
    r = client.post(f"{url}/sessions", json={"allow_tools": ["append"]})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    reply = client.post(f"{url}/sessions/{sid}/messages", json={"content": "Append a line."}).json()
    assert reply["status"] == "awaiting_approval" and reply["reply"] is None, reply
    assert [s["action"] for s in reply["steps"]] == ["awaiting_approval"]
    pending = reply["pending_approval"]
    cid = pending["call_id"]
    assert pending["tool"] == "append" and pending["arguments"]["file"] == str(effects) and len(cid) == 32
    got = client.get(f"{url}/sessions/{sid}").json()
    assert got["status"] == "awaiting_approval" and got["pending_approval"] == pending and not effects.exists()

    approvals = f"{url}/sessions/{sid}/approvals"
    for body in ({"content": "hello?"}, {"content": "hello?", "stream": True}):
        _error(client.post(f"{url}/sessions/{sid}/messages", json=body), 409, "awaiting_approval", cid)
    b = httpx.Client(headers=_as(KEY_B), timeout=120)
    _error(b.post(approvals, json={"call_id": cid, "decision": "approve"}), 404, "not_found_error", "no session")
    _error(b.get(f"{url}/sessions/{sid}"), 404, "not_found_error", "no session")
    b.close()
    bad = client.post(approvals, json={"call_id": cid, "decision": "maybe"})
    _error(bad, 400, "invalid_request_error", '"approve" or "reject"')
    assert bad.json()["error"]["param"] == "decision"
    _error(client.post(approvals, json={"call_id": "c0ffee", "decision": "approve"}), 409, "approval_conflict", cid)
    bad = client.post(approvals, json={"call_id": cid, "decision": "approve", "arguments": {"file": "/etc/x", "text": "a"}})
    _error(bad, 400, "invalid_request_error", "arguments do not fit the schema of append")
    assert bad.json()["error"]["param"] == "arguments"

    # The paused session lives in the store only: kill its actor and the ingress replica.
    _kill_session_actor(specs["approve"], sid)
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "approve" in a["name"] and "AgentIngress" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            r = client.get(f"{url}/sessions/{sid}")
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the ingress replica did not come back"
        time.sleep(1)
    assert r.json()["pending_approval"] == pending

    edited = {"file": str(effects), "text": "edited"}
    r = client.post(approvals, json={"call_id": cid, "decision": "approve", "arguments": edited, "reason": "fine"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "active" and done["reply"] and done["pending_approval"] is None
    assert [s["action"] for s in done["steps"]] == ["tool", "answer"]  # max_tool_rounds 1: then the answer
    ran = done["steps"][0]
    assert ran["n"] == 1 and ran["tool"]["ok"] and ran["tool"]["arguments"] == edited and ran["approval"]["edited"]
    assert _effects(effects) == [[cid, "edited"]]  # once, with the edited arguments and the call's key
    _error(client.post(approvals, json={"call_id": cid, "decision": "approve"}), 409, "approval_conflict",
           "no call awaiting approval")

    again = client.post(f"{url}/sessions/{sid}/messages", json={"content": "One more?"}).json()
    assert again["status"] == "awaiting_approval" and again["pending_approval"]["call_id"] != cid
    r = client.post(approvals, json={"call_id": again["pending_approval"]["call_id"], "decision": "reject",
                                     "reason": "not needed"})
    assert r.status_code == 200, r.text
    rejected = r.json()
    assert [s["action"] for s in rejected["steps"]] == ["refused", "answer"] and rejected["reply"]
    assert "rejected this call of append: not needed" in rejected["steps"][0]["error"]
    assert _effects(effects) == [[cid, "edited"]]  # a rejected call never runs
    got = client.get(f"{url}/sessions/{sid}").json()
    assert got["errors"]["tool_rejected:append"] == 1 and got["usage"]["tool_calls"] == 1 and got["calls"] == {}
    assert [s["n"] for s in got["steps"]] == [1, 2, 3, 4]


@pytest.mark.timeout(600)
def test_actor_killed_between_a_side_effect_and_its_step_save_runs_the_call_once(vllm_url, storage_root, ray_local,
                                                                                 monkeypatch):
    """The session actor exits (a test hook: os._exit) right after the tool appended its line and
    the result was recorded, before the step was saved; resuming finishes the step from the
    record. Through an approval (the retried decision completes the session) and a plain turn
    (the next message finishes the cut-off step first)."""
    import asyncio

    from ray.exceptions import RayActorError

    from runtime.agents.loop import idempotency_key
    from runtime.agents.runner import prepare_app_config
    from runtime.agents.worker import CRASH_AFTER_RECORD, SessionRouter

    marker = storage_root / "crashed-after-record"
    monkeypatch.setenv(CRASH_AFTER_RECORD, str(marker))  # forwarded to the session actors this test starts
    loop = asyncio.new_event_loop()
    routers = []

    def router_for(name, effects, **flags):
        spec = agent_spec(name, vllm_url, storage_root, auth="none", session_workers=1, llm={"max_tool_rounds": 1},
                          tools=[append_tool(effects, **flags)])
        routers.append(SessionRouter(prepare_app_config(spec)))
        return routers[-1]

    try:
        effects = storage_root / "effects-approved.txt"
        router = router_for("effects1", effects, requires_approval=True)
        sid = loop.run_until_complete(router.create(None, ["append"]))["id"]
        pending = loop.run_until_complete(router.send(sid, "Append a line."))["pending_approval"]
        # The actor dies mid-decision; the router repeats the decision on a fresh actor.
        done = loop.run_until_complete(router.decide(sid, pending["call_id"], "approve"))
        assert marker.read_text() == pending["call_id"]  # it did die in the window
        assert done["status"] == "active" and done["reply"], done
        assert [s["action"] for s in done["steps"]] == ["tool", "answer"]
        assert done["steps"][0]["tool"]["reused"] is True
        assert _effects(effects) == [[pending["call_id"], pending["arguments"]["text"]]]  # exactly one effect
        got = loop.run_until_complete(router.get(sid))
        assert got["errors"]["interrupted"] == 1 and got["calls"] == {} and got["status"] == "active"

        marker.unlink()  # arm the hook again, for a plain side-effecting call (allowed, no approval)
        effects = storage_root / "effects-plain.txt"
        router = router_for("effects2", effects)
        sid = loop.run_until_complete(router.create(None, ["append"]))["id"]
        with pytest.raises(RayActorError):
            loop.run_until_complete(router.send(sid, "Append a line."))
        key = idempotency_key(sid, 1)
        assert marker.read_text() == key
        crashed = loop.run_until_complete(router.get(sid))
        assert crashed["turn_open"] and crashed["steps"] == [] and crashed["calls"][key]["out"]["ok"]
        assert [k for k, _ in _effects(effects)] == [key]
        reply = loop.run_until_complete(router.send(sid, "Go on."))
        assert reply["status"] == "active" and reply["reply"], reply
        got = loop.run_until_complete(router.get(sid))
        first = got["steps"][0]
        assert first["n"] == 1 and first["resumed"] and first["tool"]["reused"] and first["tool"]["idempotency_key"] == key
        keys = [k for k, _ in _effects(effects)]
        assert keys.count(key) == 1  # the cut-off call ran once; the next turn's own call has its own key
        assert got["errors"]["interrupted"] == 1 and got["calls"] == {}
        assert [s["n"] for s in got["steps"]] == list(range(1, len(got["steps"]) + 1))
    finally:
        for r in routers:
            r.kill_actors()
        loop.close()
