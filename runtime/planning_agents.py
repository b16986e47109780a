"""Capacity planning for agents: from a traffic profile to LLM load, replicas, session actors
and the session store's load.

>>> from runtime.planning_agents import plan_agent
>>> p = plan_agent({"sessions_per_s": 2, "steps_per_session": 3, "prompt_tokens": 1000, "output_tokens": 50})
>>> p.prompt_tokens_per_session, p.llm_tokens_per_s      # 3 x 1000 + 50 x (0 + 1 + 2); + 2 x 3 x 50 output
(3150.0, 6600.0)

The model (README, section Capacity planner, has the same formulas). With λ sessions/s, S LLM
steps and T tool calls per session, P0 prompt tokens in a session's first call, O output tokens
per call and G tokens the history grows by per step (default O + R × T/S, R the tokens a tool
result adds):

- prompt tokens per session = S × P0 + G × S(S−1)/2 (call k sees the k−1 steps before it);
  LLM tokens/s = λ × (prompt + S × O);
- replicas = ceil(tokens/s / (replica tokens/s × u)), where u keeps the queueing-inflated first
  token within the target: TTFT ≈ prefill / (1 − u) (an M/M/1 approximation), so
  u = min(max_utilization, 1 − prefill / TTFT target), prefill = mean prompt / prefill tokens/s;
- a session is busy S × (LLM step + overhead) + T × tool latency and idle (turns − 1) × think
  time; Little's law gives the concurrent sessions (λ × duration), active and idle;
- session actors = the most of: active sessions / the actor's concurrency (1000), and the
  orchestration CPU (steps/s × overhead per step) / the share of a core one actor should use;
- store: one write when a message arrives, one per step and one when the turn ends
  (S + 2 × turns per session), each the whole session document, which grows by a step record
  and its messages per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field, ValidationError, model_validator

from runtime.errors import SpecError, SpecProblem
from runtime.specs.common import StrictModel

# Measured on bench.agent's sessions (2026-12-01): an empty session document is ~370 bytes, the
# JSON around a message 40-110 bytes, a step record 340 (answer) to 500 (tool call) bytes.
SESSION_BASE_BYTES = 400  # an empty session document (ids, usage, errors)
MESSAGE_BYTES = 60  # JSON around one message (role, turn; a tool result's fence id and name)
IN_MEMORY_FACTOR = 4  # a parsed session dict in the actor takes ~4x its JSON size


class AgentProfile(StrictModel):
    """An agent's traffic, per session: how many, how long, how many tokens."""

    sessions_per_s: float = Field(gt=0, description="New sessions per second (the arrival rate).")
    steps_per_session: float = Field(ge=1, description="LLM calls per session, over all its turns.")
    prompt_tokens: float = Field(
        gt=0, description="Prompt tokens of a session's first LLM call (system prompt with the tool schemas + the "
        "first message).")
    output_tokens: float = Field(gt=0, description="Completion tokens per LLM call.")
    turns_per_session: int = Field(1, ge=1, description="User messages per session.")
    tool_calls_per_session: float | None = Field(
        None, ge=0, description="Tool calls per session; default steps - turns (each turn's last step answers).")
    tool_result_tokens: float = Field(0, ge=0, description="Tokens one tool result adds to the history.")
    history_tokens_per_step: float | None = Field(
        None, ge=0, description="Tokens the prompt grows by per step; default output_tokens + tool_result_tokens x "
        "tool calls per step. 0: prompts do not grow.")
    tool_latency_s: float = Field(0, ge=0, description="Seconds one tool call takes.")
    think_time_s: float = Field(0, ge=0, description="Seconds a user takes between two turns (the session idles).")
    llm_step_s: float | None = Field(
        None, gt=0, description="Seconds one LLM call takes; default ttft_s + output_tokens / decode_tokens_per_s.")
    decode_tokens_per_s: float = Field(50, gt=0, description="Output tokens/s of one stream (for llm_step_s).")
    replica_tokens_per_s: float | None = Field(
        None, gt=0, description="Prompt + output tokens/s one LLM replica sustains (measure it: python -m bench "
        "serve); unset: no replica count.")
    prefill_tokens_per_s: float | None = Field(
        None, gt=0, description="Prompt tokens/s one replica prefills; default replica_tokens_per_s.")
    ttft_s: float = Field(1.0, gt=0, description="Time-to-first-token target of one LLM call.")
    max_utilization: float = Field(0.8, gt=0, le=1, description="Highest share of a replica's throughput to plan for.")
    overhead_ms: float = Field(2.0, ge=0, description="Orchestration CPU per step in the session actor (bench.agent).")
    actor_concurrency: int = Field(1000, ge=1, description="Turns one session actor runs at once (its max_concurrency).")
    actor_cpu_share: float = Field(0.5, gt=0, le=1, description="Share of a core one session actor should use at most.")
    actor_memory_mb: float = Field(
        180, ge=0, description="Memory of a session actor (bench.agent: ~150 MB RSS idle, ~180 MB after 500 sessions).")
    tool_process_mb: float = Field(
        10, ge=0, description="Memory of one tool process beside a session actor (bench.agent: ~7 MB PSS running the "
        "calculator; more for tools that import more).")
    step_record_bytes: float = Field(450, ge=0, description="JSON bytes of one step record in the session document.")
    bytes_per_token: float = Field(4, gt=0, description="Characters per token of message text (~4 for English).")
    retention_s: float | None = Field(
        None, gt=0, description="How long ended sessions stay in the store; unset: only the growth rate is given.")

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.steps_per_session < self.turns_per_session:
            problems.append(f"steps_per_session ({self.steps_per_session:g}) is below turns_per_session "
                            f"({self.turns_per_session}): every turn takes at least one LLM step")
        if self.tool_calls_per_session is not None and self.tool_calls_per_session > self.steps_per_session:
            problems.append(f"tool_calls_per_session ({self.tool_calls_per_session:g}) exceeds steps_per_session "
                            f"({self.steps_per_session:g}): each step calls at most one tool")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class AgentPlan:
    profile: dict[str, Any]
    steps_per_s: float
    tool_calls_per_s: float
    history_tokens_per_step: float
    prompt_tokens_per_session: float
    mean_prompt_tokens: float
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    llm_tokens_per_s: float
    llm_step_s: float
    prefill_s: float
    replica_utilization: float | None
    llm_replicas: int | None
    session_busy_s: float
    session_duration_s: float
    concurrent_sessions: float
    active_sessions: float
    idle_sessions: float
    concurrent_llm_calls: float
    concurrent_tool_calls: float
    orchestration_cores: float
    session_actors: int
    tool_processes_per_actor: int
    session_bytes: float
    actors_memory_mb: float
    store_writes_per_s: float
    store_write_bytes_per_s: float
    store_growth_bytes_per_s: float
    store_growth_gb_per_day: float
    store_size_gb: float | None
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def load_profile(data: Any, source: str = "agent profile") -> AgentProfile:
    """A validated profile from a dict (or a profile); ``SpecError`` lists every bad field."""
    if isinstance(data, AgentProfile):
        return data
    if not isinstance(data, dict):
        raise SpecError(source, [SpecProblem("", f"an agent profile is a mapping of fields, got {type(data).__name__}")],
                        hint="e.g. raylane plan --agent sessions_per_s=2 steps_per_session=3 prompt_tokens=1000 "
                        "output_tokens=50")
    try:
        return AgentProfile.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, [_problem(err) for err in e.errors()],
                        hint="fields: " + ", ".join(AgentProfile.model_fields)) from None


def _problem(err: dict) -> SpecProblem:
    import difflib

    loc = [str(x) for x in err.get("loc", ())]
    path = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        guess = difflib.get_close_matches(loc[-1], list(AgentProfile.model_fields), n=1, cutoff=0.6)
        return SpecProblem(path, "unknown field" + (f"; did you mean {guess[0]!r}?" if guess else ""))
    field = AgentProfile.model_fields.get(loc[0]) if loc else None
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if field is not None and field.description:
        msg += f" ({field.description})"
    return SpecProblem(path, msg)


def plan_agent(profile: AgentProfile | dict[str, Any]) -> AgentPlan:
    """Size an agent deployment from its traffic profile (formulas in the module docstring)."""
    p = load_profile(profile)
    notes: list[str] = []
    lam, s, turns = p.sessions_per_s, p.steps_per_session, p.turns_per_session
    tools = p.tool_calls_per_session if p.tool_calls_per_session is not None else s - turns
    growth = p.history_tokens_per_step
    if growth is None:
        growth = p.output_tokens + p.tool_result_tokens * tools / s

    prompt_per_session = s * p.prompt_tokens + growth * s * (s - 1) / 2
    prompt_s = lam * prompt_per_session
    output_s = lam * s * p.output_tokens
    tokens_s = prompt_s + output_s
    mean_prompt = prompt_per_session / s

    llm_step = p.llm_step_s if p.llm_step_s is not None else p.ttft_s + p.output_tokens / p.decode_tokens_per_s
    if p.llm_step_s is None:
        notes.append(f"LLM step time estimated as ttft_s + output_tokens / decode_tokens_per_s = {llm_step:.3g} s "
                     "(set llm_step_s to a measured value)")
    prefill_rate = p.prefill_tokens_per_s or p.replica_tokens_per_s
    prefill = mean_prompt / prefill_rate if prefill_rate else 0.0
    util = replicas = None
    if p.replica_tokens_per_s:
        util = min(p.max_utilization, 1 - prefill / p.ttft_s)
        if util <= 0:
            notes.append(f"TTFT target {p.ttft_s:g} s is unreachable: prefilling the mean prompt ({mean_prompt:.0f} "
                         f"tokens) takes {prefill:.3g} s at {prefill_rate:g} tokens/s; planned at 10% utilization")
            util = 0.1
        replicas = max(1, math.ceil(tokens_s / (p.replica_tokens_per_s * util) - 1e-9))
    else:
        notes.append("LLM replicas not sized: set replica_tokens_per_s (python -m bench serve measures it)")

    overhead = p.overhead_ms / 1000
    busy = s * (llm_step + overhead) + tools * p.tool_latency_s
    duration = busy + (turns - 1) * p.think_time_s
    steps_s = lam * s
    cores = steps_s * overhead
    active = lam * busy
    actors = max(1, math.ceil(active / p.actor_concurrency - 1e-9), math.ceil(cores / p.actor_cpu_share - 1e-9))
    conc_tools = lam * tools * p.tool_latency_s
    procs = max(1, math.ceil(conc_tools / actors - 1e-9)) if tools else 0

    step_bytes = p.step_record_bytes + growth * p.bytes_per_token + 2 * MESSAGE_BYTES
    session_bytes = SESSION_BASE_BYTES + turns * MESSAGE_BYTES + s * step_bytes
    writes = s + 2 * turns
    # Every write stores the whole document; on average it is half grown.
    mean_doc = SESSION_BASE_BYTES + s * step_bytes / 2
    memory = actors * (p.actor_memory_mb + procs * p.tool_process_mb) + active * session_bytes * IN_MEMORY_FACTOR / 1e6
    growth_bytes = lam * session_bytes
    return AgentPlan(
        profile=p.model_dump(),
        steps_per_s=_r(steps_s),
        tool_calls_per_s=_r(lam * tools),
        history_tokens_per_step=_r(growth),
        prompt_tokens_per_session=_r(prompt_per_session),
        mean_prompt_tokens=_r(mean_prompt),
        prompt_tokens_per_s=_r(prompt_s),
        output_tokens_per_s=_r(output_s),
        llm_tokens_per_s=_r(tokens_s),
        llm_step_s=_r(llm_step),
        prefill_s=_r(prefill),
        replica_utilization=None if util is None else _r(util),
        llm_replicas=replicas,
        session_busy_s=_r(busy),
        session_duration_s=_r(duration),
        concurrent_sessions=_r(lam * duration),
        active_sessions=_r(active),
        idle_sessions=_r(lam * (duration - busy)),
        concurrent_llm_calls=_r(steps_s * llm_step),
        concurrent_tool_calls=_r(conc_tools),
        orchestration_cores=_r(cores),
        session_actors=actors,
        tool_processes_per_actor=procs,
        session_bytes=_r(session_bytes),
        actors_memory_mb=_r(memory),
        store_writes_per_s=_r(lam * writes),
        store_write_bytes_per_s=_r(lam * writes * mean_doc),
        store_growth_bytes_per_s=_r(growth_bytes),
        store_growth_gb_per_day=_r(growth_bytes * 86400 / 1e9),
        store_size_gb=None if p.retention_s is None else _r(growth_bytes * p.retention_s / 1e9),
        notes=notes,
    )


def _r(x: float) -> float:
    return round(float(x), 4)
