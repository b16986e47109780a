"""Capacity planner: the seeds' numbers, through the CLI's JSON."""

import json

import pytest

from runtime.errors import SpecError, UsageError
from runtime.planning import plan
from runtime.planning_agents import MESSAGE_BYTES, SESSION_BASE_BYTES
from tests.conftest import run_cli


def _plan(*args):
    r = run_cli("plan", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_7b_fp16_is_about_14_gb():
    d = _plan("--params", "7e9", "--dtype", "fp16")
    assert d["weights_gb_si"] == pytest.approx(14.0)
    assert d["weights_gb"] == pytest.approx(13.04, abs=0.01)  # GiB, as GPUs report memory
    assert d["fits"] is True  # on the default H100-80GB


def test_70b_fp16_is_130_gib_and_at_least_26s_to_load():
    d = _plan("--params", "70e9", "--dtype", "fp16", "--load-gbps", "5", "--gpu", "H100-80GB")
    assert d["weights_gb"] == pytest.approx(130.4, abs=0.1)
    assert d["load_seconds"] >= 26
    assert d["fits"] is False and d["min_gpus"] == 2


@pytest.mark.parametrize("per_replica,expected", [(4, 125), (5, 100)])
def test_500_streams_need_100_to_125_replicas(per_replica, expected):
    d = _plan("--params", "7e9", "--concurrent-streams", "500", "--streams-per-replica", str(per_replica),
              "--peak-to-average", "10", "--headroom", "1.5")
    assert d["peak_replicas"] == expected
    assert d["steady_replicas"] == -(-expected * 15 // 100)  # ceil(peak / 10 * 1.5)


def test_bytes_per_param_and_kv_cache():
    assert plan(1e9, "fp32").weights_gb_si == 4.0
    assert plan(1e9, "int8").weights_gb_si == 1.0
    assert plan(1e9, "fp8").weights_gb_si == 1.0
    assert plan(1e9, "int4").weights_gb_si == 0.5
    # Llama-2-7B: 32 layers x 32 KV heads x 128 dim, 4096 ctx, fp16 -> 2 GiB per sequence
    p = plan(7e9, "fp16", layers=32, kv_heads=32, head_dim=128, context=4096, batch=1)
    assert p.kv_cache_gb == pytest.approx(2.0)
    big = plan(7e9, "fp16", layers=32, kv_heads=32, head_dim=128, context=4096, batch=8, gpu="L4")
    assert big.kv_cache_gb == pytest.approx(16.0) and big.fits is False


@pytest.mark.parametrize("gpu,mem", [("L4", 24), ("A10G", 24), ("A100-40GB", 40), ("A100-80GB", 80),
                                     ("H100-80GB", 80), ("H200-141GB", 141), ("h100", 80)])
def test_gpu_skus(gpu, mem):
    assert plan(1e9, gpu=gpu).gpu_memory_gb == mem


def test_bad_input_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown dtype"):
        plan(7e9, "fp12")
    r = run_cli("plan", "--json", "--params", "7e9", "--gpu", "V100")
    assert r.returncode == 2 and "unknown GPU" in r.stderr and "Traceback" not in r.stderr


# Agent plans: hand-computed from the formulas in runtime/planning_agents.py (and the README).
AGENT = {"sessions_per_s": 2, "steps_per_session": 5, "turns_per_session": 2, "prompt_tokens": 1000,
         "output_tokens": 50, "tool_result_tokens": 40, "tool_latency_s": 0.5, "think_time_s": 30,
         "llm_step_s": 1.5, "replica_tokens_per_s": 5000, "ttft_s": 1.0, "overhead_ms": 2.0}


def test_agent_llm_load_models_prompts_growing_with_the_history():
    p = plan(agent=AGENT)
    # 3 tool calls (5 steps - 2 answers); history grows 50 + 40 x 3/5 = 74 tokens a step
    assert p.tool_calls_per_s == 6 and p.history_tokens_per_step == 74
    assert p.prompt_tokens_per_session == 5 * 1000 + 74 * 10  # calls see 0, 1, 2, 3, 4 steps before them
    assert p.prompt_tokens_per_s == 2 * 5740 and p.output_tokens_per_s == 2 * 5 * 50
    assert p.llm_tokens_per_s == 11480 + 500
    assert p.mean_prompt_tokens == 1148
    flat = plan(agent={**AGENT, "history_tokens_per_step": 0})
    assert flat.prompt_tokens_per_s == 2 * 5 * 1000


def test_agent_replicas_from_throughput_and_the_ttft_target():
    p = plan(agent=AGENT)
    # prefill 1148 / 5000 = 0.2296 s -> u = min(0.8, 1 - 0.2296) = 0.7704; 11980 / (5000 x 0.7704) = 3.11
    assert p.prefill_s == pytest.approx(0.2296) and p.replica_utilization == pytest.approx(0.7704)
    assert p.llm_replicas == 4
    loose = plan(agent={**AGENT, "ttft_s": 10})  # the utilization cap (0.8) binds: 11980 / 4000 = 2.995
    assert loose.replica_utilization == 0.8 and loose.llm_replicas == 3
    fast_prefill = plan(agent={**AGENT, "prefill_tokens_per_s": 114800})  # 0.01 s prefill, cap binds
    assert fast_prefill.llm_replicas == 3
    impossible = plan(agent={**AGENT, "ttft_s": 0.2})
    assert impossible.replica_utilization == 0.1 and "unreachable" in impossible.notes[0]
    assert plan(agent={k: v for k, v in AGENT.items() if k != "replica_tokens_per_s"}).llm_replicas is None


def test_agent_sessions_by_littles_law_and_actor_counts():
    p = plan(agent=AGENT)
    busy = 5 * (1.5 + 0.002) + 3 * 0.5  # 9.01 s working, then one 30 s think time between the 2 turns
    assert p.session_busy_s == pytest.approx(busy) and p.session_duration_s == pytest.approx(busy + 30)
    assert p.active_sessions == pytest.approx(2 * busy) and p.idle_sessions == pytest.approx(60)
    assert p.concurrent_sessions == pytest.approx(2 * (busy + 30))
    assert p.concurrent_llm_calls == 15 and p.concurrent_tool_calls == 3
    assert p.session_actors == 1 and p.tool_processes_per_actor == 3
    # 10 steps/s x 2 ms = 0.02 cores; at 5,000 sessions/s: 50 cores / 0.5 of a core per actor = 100 actors
    big = plan(agent={**AGENT, "sessions_per_s": 5000})
    assert big.orchestration_cores == 50 and big.session_actors == 100
    many = plan(agent={**AGENT, "sessions_per_s": 500, "llm_step_s": 10, "overhead_ms": 0})
    assert many.active_sessions == 500 * 51.5 and many.session_actors == 26  # 25,750 turns / 1000 per actor


def test_agent_store_writes_and_growth():
    p = plan(agent={**AGENT, "retention_s": 86400, "step_record_bytes": 1000, "bytes_per_token": 4})
    assert p.store_writes_per_s == 2 * (5 + 2 * 2)
    step = 1000 + 74 * 4 + 2 * MESSAGE_BYTES  # record + history text + two messages' JSON
    doc = SESSION_BASE_BYTES + 2 * MESSAGE_BYTES + 5 * step  # + the two user messages
    assert p.session_bytes == doc and p.store_growth_bytes_per_s == 2 * doc
    assert p.store_write_bytes_per_s == pytest.approx(18 * (SESSION_BASE_BYTES + 5 * step / 2))
    assert p.store_size_gb == pytest.approx(2 * doc * 86400 / 1e9, abs=1e-4)


def test_agent_cli_flags_and_profile_file(tmp_path):
    f = tmp_path / "profile.yaml"
    f.write_text("sessions_per_s: 1\nsteps_per_session: 2\nprompt_tokens: 500\noutput_tokens: 20\n")
    d = _plan("--agent", str(f), "sessions_per_s=4")  # a pair after the file overrides it
    assert d["llm_tokens_per_s"] == 4 * (2 * 500 + 20 + 2 * 20) and d["profile"]["sessions_per_s"] == 4
    text = run_cli("plan", "--agent", str(f))
    assert text.returncode == 0, text.stderr
    assert "LLM:       1,060 tokens/s (1,020 prompt + 40 output)" in text.stdout and "store:" in text.stdout


def test_agent_bad_profile_names_each_field_and_the_fix():
    r = run_cli("plan", "--agent", "sessions_per_s=0", "step_per_session=3", "prompt_tokens=abc", "output_tokens=5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sessions_per_s: Input should be greater than 0" in r.stderr
    assert "step_per_session: unknown field; did you mean 'steps_per_session'?" in r.stderr
    assert "steps_per_session: Field required" in r.stderr and "prompt_tokens: Input should be a valid number" in r.stderr
    with pytest.raises(SpecError, match="every turn takes at least one LLM step"):
        plan(agent={**AGENT, "steps_per_session": 1})
    with pytest.raises(SpecError, match="each step calls at most one tool"):
        plan(agent={**AGENT, "tool_calls_per_session": 6})
    both = run_cli("plan", "--params", "7e9", "--agent", "sessions_per_s=1")
    assert both.returncode == 2 and "not both" in both.stderr
    missing = run_cli("plan", "--agent", "nothere.yaml")
    assert missing.returncode == 2 and "not a file, and not FIELD=VALUE" in missing.stderr
