"""Spec for ``Agent``: tool-using sessions on Ray actors behind a Serve ingress.

>>> from runtime.specs import parse_spec
>>> spec = parse_spec({"kind": "Agent", "name": "helper",
...     "tools": [{"name": "calculator", "import_path": "runtime.agents.tools:calculator"}]})
>>> spec.budgets.max_steps
16
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from runtime.imports import check_import_path
from runtime.specs.common import SpecBase, StrictModel
from runtime.specs.serving import RateLimitSpec
from runtime.specs.shape import Shape

TOOL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class AgentLLM(StrictModel):
    """The model the agent thinks with: served beside it, or any OpenAI-compatible endpoint."""

    model: str | None = Field(
        "tiny", description="Model served beside the agent (folder, 'tiny', models:/NAME@ALIAS); ignored with url."
    )
    url: str | None = Field(
        None, description="Base URL of any OpenAI-compatible server (e.g. http://host:8000/v1) instead of a co-located model."
    )
    model_id: str | None = Field(
        None, description="Model name sent in requests; default: the served model's id ('<spec name>-llm' when co-located)."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the bearer key for url (e.g. OPENAI_API_KEY); None = no key."
    )
    max_tokens: int = Field(256, ge=32, description="Completion token cap per LLM call.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature per LLM call.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one LLM call.")
    guided_json: bool = Field(
        True,
        description="Constrain every reply to the action JSON schema with vLLM structured outputs "
        "(so even a random model emits schema-valid calls). Off = free text, parsed as JSON.",
    )
    tool_choice: Literal["auto", "required"] = Field(
        "auto", description="'required': the first step of every message must call a tool; 'auto': the model decides."
    )
    max_tool_rounds: int = Field(
        4, ge=0, description="Tool steps per user message; after that the schema only allows a final answer."
    )
    max_answer_chars: int = Field(
        2000, ge=1, description="Longest final answer the schema allows (also capped at (max_tokens - 16) / 4 when guided)."
    )
    max_model_len: int = Field(2048, ge=64, description="Context length of the co-located engine.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Passed to vLLM as is for the co-located model."
    )

    @model_validator(mode="after")
    def _one(self):
        if self.url:
            self.model = None
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url must start with http:// or https:// (got {self.url!r})")
        if not self.model and not self.url:
            raise ValueError("set model (served beside the agent) or url (an OpenAI-compatible endpoint)")
        return self


class ToolSpec(StrictModel):
    """A Python function the agent may call, beside the session worker (see isolation), with a timeout and retries."""

    name: str = Field(description="Name the model uses to call the tool (letters, digits, '_' and '-').")
    import_path: str = Field(description="module:function implementing the tool; takes the arguments as keywords.")
    description: str | None = Field(None, description="What the tool does (shown to the model); default: its docstring.")
    timeout_s: float = Field(10.0, gt=0, description="Seconds one attempt may take before it is cancelled.")
    retries: int = Field(1, ge=0, description="Extra attempts after a failure or timeout.")
    max_concurrency: int = Field(4, ge=1, description="Calls of this tool running at once across all sessions.")
    num_cpus: float = Field(
        0.0, ge=0, description="CPUs one call reserves (0: I/O-bound tools; > 0 needs isolation: ray_task).")
    isolation: Literal["process", "thread", "ray_task"] | None = Field(
        None, description="Where a call runs. process: a pooled process beside the session worker, killed on a timeout "
        "(~0.1 ms a call); thread: in the session worker itself (cheapest, but a timed-out call is abandoned, not "
        "killed: only for trusted tools that cannot hang); ray_task: a Ray task per call (~5 ms; honours num_cpus). "
        "Default: ray_task when num_cpus > 0, else process.",
    )
    parameters: dict[str, Any] | None = Field(
        None, description="JSON schema of the arguments; default: the function's own PARAMETERS attribute."
    )
    side_effects: bool = Field(
        False, description="The tool changes something outside the session (sends, writes, buys): it runs only in "
        "sessions created with allow_tools naming it; otherwise the call is refused and the model is told.",
    )
    requires_approval: bool = Field(
        False, description="A person approves each call first: the session pauses (status awaiting_approval) until "
        "POST /sessions/ID/approvals approves (optionally with edited arguments) or rejects it.",
    )
    idempotent: bool = Field(
        False, description="The tool deduplicates by its idempotency_key keyword (a repeated key has no second "
        "effect): a call cut off between its effect and the recorded result is re-sent with the same key instead of "
        "being reported as of unknown outcome.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TOOL_NAME_RE.match(v):
            raise ValueError("must start with a letter or '_' and contain only letters, digits, '_' and '-'")
        if v in ("retrieve",):
            raise ValueError(f"{v!r} is reserved for the retrieval tool (configure it under retrieval:)")
        return v

    @field_validator("import_path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_import_path(v, example="module:function, e.g. runtime.agents.tools:calculator")

    @model_validator(mode="after")
    def _isolation(self):
        if self.isolation is None:
            self.isolation = "ray_task" if self.num_cpus > 0 else "process"
        elif self.num_cpus > 0 and self.isolation != "ray_task":
            raise ValueError(f"num_cpus reserves CPUs through Ray's scheduler, which only isolation: ray_task uses "
                             f"(got isolation: {self.isolation}); set isolation: ray_task, or num_cpus: 0")
        return self


MCP_SERVER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def mcp_tool_name(server: str, tool: str) -> str:
    """The agent's name for an MCP server's tool: ``SERVER__TOOL``, with characters a tool name
    cannot hold (MCP allows '.' and '/') as '_' (OpenAI-style function names: [A-Za-z0-9_-]{1,64}).

    >>> mcp_tool_name("files", "read.file")
    'files__read_file'
    """
    return f"{server}__{re.sub(r'[^A-Za-z0-9_-]', '_', tool)}"


class McpServerSpec(StrictModel):
    """An MCP tool server: its allowed tools become the agent's ``NAME__TOOL`` tools, with the
    server's own JSON schemas guiding the model's calls."""

    name: str = Field(description="Short name; the agent's tools from this server are called NAME__TOOL.")
    transport: Literal["stdio", "http"] = Field(
        description="stdio: each session worker starts `command` beside itself; http: a streamable HTTP endpoint (url)."
    )
    command: str | None = Field(None, description="stdio: the program that serves MCP on stdin/stdout (e.g. python).")
    args: list[str] = Field(default_factory=list, description="stdio: arguments of command.")
    env: dict[str, str] = Field(
        default_factory=dict, description="stdio: environment of the server (not secrets; see pass_env)."
    )
    pass_env: list[str] = Field(
        default_factory=list, description="stdio: names of the session worker's environment variables the server gets "
        "too (secrets stay out of the spec).",
    )
    cwd: str | None = Field(None, description="stdio: working directory of the server; default: the worker's.")
    url: str | None = Field(None, description="http: the MCP endpoint, e.g. https://tools.internal/mcp.")
    headers_env: dict[str, str] = Field(
        default_factory=dict, description="http: header name -> name of the environment variable (on the session "
        "workers) holding its value, e.g. {Authorization: MCP_AUTH} with MCP_AUTH='Bearer ...'. Never literal tokens.",
    )
    allow_tools: list[str] = Field(
        min_length=1, description="The server's tools the agent may call (its own names); a name the server does not "
        "offer fails the agent's start.",
    )
    side_effects: list[str] | None = Field(
        None, description="Which allowed tools change something (run only in sessions allowing them). Default: every "
        "tool the server does not annotate readOnlyHint: true.",
    )
    requires_approval: list[str] = Field(
        default_factory=list, description="Allowed tools whose every call a person approves first (the session pauses "
        "until POST /sessions/ID/approvals).",
    )
    idempotent: list[str] = Field(
        default_factory=list, description="Allowed tools that deduplicate by the idempotency_key in the call's _meta "
        "(a call cut off between its effect and the recorded result is re-sent with the same key).",
    )
    timeout_s: float = Field(10.0, gt=0, description="Seconds one call attempt may take before it is cancelled.")
    retries: int = Field(1, ge=0, description="Extra attempts after a failure or timeout.")
    max_concurrency: int = Field(4, ge=1, description="Calls to this server running at once across all sessions.")
    connect_timeout_s: float = Field(30.0, gt=0, description="Seconds to start or connect to the server and list its tools.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not MCP_SERVER_NAME_RE.match(v) or "__" in v:
            raise ValueError("must start with a letter, have at most 32 letters, digits, '_' or '-', and no '__'")
        return v

    @field_validator("pass_env")
    @classmethod
    def _env_names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not ENV_NAME_RE.match(n)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _transport(self):
        problems = []
        stdio_only = [f for f in ("command", "cwd") if getattr(self, f)] + [f for f in ("args", "env", "pass_env")
                                                                               if getattr(self, f)]
        if self.transport == "stdio":
            if not self.command:
                problems.append("transport stdio needs command (the program to start, e.g. command: python)")
            if self.url or self.headers_env:
                problems.append("only transport http takes url and headers_env")
        else:
            if not (self.url or "").startswith(("http://", "https://")):
                problems.append("transport http needs url: http(s)://HOST/PATH (the server's MCP endpoint)")
            if stdio_only:
                problems.append(f"only transport stdio takes {', '.join(stdio_only)}")
        bad_env = [f"{h}: {n}" for h, n in self.headers_env.items() if not ENV_NAME_RE.match(n)]
        if bad_env:
            problems.append(f"headers_env values must be environment variable names, not values ({', '.join(bad_env)})")
        names = self.tool_names()
        dup = sorted({t for t, n in zip(self.allow_tools, names) if names.count(n) > 1})
        if dup:
            problems.append(f"allow_tools repeats {', '.join(dup)} (as agent tool names)")
        long = [n for n in names if len(n) > 64]
        if long:
            problems.append(f"tool names over 64 characters: {', '.join(long)} (shorten the server name)")
        for field in ("side_effects", "requires_approval", "idempotent"):
            extra = sorted(set(getattr(self, field) or ()) - set(self.allow_tools))
            if extra:
                problems.append(f"{field} names tools not in allow_tools: {', '.join(extra)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def tool_names(self) -> list[str]:
        """The agent's names for the allowed tools (what the model and allow_tools use)."""
        return [mcp_tool_name(self.name, t) for t in self.allow_tools]


class RetrievalSpec(StrictModel):
    """Documents the agent can search: indexed by a Ray Data job, queried by the 'retrieve' tool."""

    corpus: str = Field(description="Documents to index: a .jsonl/.parquet file or folder with a text column, or 'sample'.")
    index: str | None = Field(None, description="Index location; default <storage root>/runs/<name>/index.")
    text_column: str = Field("text", description="Column holding the document text.")
    chunk_chars: int = Field(400, ge=32, description="Characters per chunk.")
    chunk_overlap: int = Field(50, ge=0, description="Characters shared by neighbouring chunks.")
    dim: int = Field(256, ge=16, le=8192, description="Embedding dimension of the hashed n-gram embedding.")
    top_k: int = Field(3, ge=1, description="Chunks returned per query.")
    min_score: float = Field(0.05, ge=-1, le=1, description="Cosine score below which a chunk is not a match.")
    rebuild: bool = Field(False, description="Rebuild the index even if one exists.")

    @model_validator(mode="after")
    def _overlap(self):
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_chars ({self.chunk_chars})")
        return self


class BudgetSpec(StrictModel):
    """Limits per session; the first one breached ends the session with its name as the reason."""

    max_steps: int = Field(16, ge=1, description="LLM steps (each LLM call is one step, its tool call included).")
    max_tokens: int = Field(8192, ge=1, description="Prompt + completion tokens over all LLM calls.")
    max_wall_s: float = Field(300.0, gt=0, description="Seconds spent working on the session's messages.")
    max_tool_failures: int = Field(3, ge=0, description="Failed tool calls (errors, timeouts, invalid calls) tolerated.")
    max_invalid_calls: int = Field(
        2, ge=0, description="Malformed or schema-invalid model replies in a row fed back for a retry."
    )


class SessionStoreSpec(StrictModel):
    """Where sessions persist after every step, so a killed actor or replica loses nothing."""

    backend: Literal["sqlite", "redis"] = Field("sqlite", description="sqlite (one file) or redis (shared server).")
    url: str | None = Field(
        None, description="SQLite file path or redis://host:port/db; default <storage root>/runs/<name>/sessions.db."
    )

    @model_validator(mode="after")
    def _url(self):
        if self.backend == "redis" and not (self.url or "").startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("backend redis needs url: redis://HOST:PORT/DB")
        return self


def _run_agent(spec, **options: Any):
    from runtime.agents.runner import run_agent  # Ray Serve loads only for a run

    return run_agent(spec, **options)


def _agent_serve_config(spec) -> dict[str, Any]:
    from runtime.agents.config import build_agent_serve_config

    return build_agent_serve_config(spec)


class AgentSpec(SpecBase):
    """An agent served over HTTP (``kind: Agent``)."""

    kind: Literal["Agent"] = "Agent"
    shape: ClassVar[Shape] = Shape(
        slug="agent", runner=_run_agent, kuberay="RayService", sizing="always-on", model_field="llm.model",
        serve_app="serve_apps.agent:build_agent_app", serve_config=_agent_serve_config,
    )
    llm: AgentLLM = Field(default_factory=AgentLLM, description="The model the agent calls.")
    system_prompt: str = Field(
        "You are a helpful assistant. Use tools when they help.", description="First message of every session."
    )
    tools: list[ToolSpec] = Field(default_factory=list, description="Tools the model may call.")
    mcp_servers: list[McpServerSpec] = Field(
        default_factory=list, description="MCP servers whose allowed tools the model may call (as SERVER__TOOL)."
    )
    retrieval: RetrievalSpec | None = Field(None, description="Document search exposed as the 'retrieve' tool.")
    budgets: BudgetSpec = Field(default_factory=BudgetSpec, description="Per-session limits.")
    sessions: SessionStoreSpec = Field(default_factory=SessionStoreSpec, description="Durable session store.")
    session_workers: int = Field(2, ge=1, description="Session actors; sessions are routed to one by id.")
    auth: Literal["api-key", "none"] = Field(
        "api-key", description="api-key: require a key from RAYLANE_API_KEYS (comma-separated); none: open."
    )
    rate_limit: RateLimitSpec | None = Field(
        default_factory=RateLimitSpec, description="Per-API-key request rate limit at the ingress; null disables it."
    )
    max_message_chars: int = Field(
        8000, ge=1, description="Longest user message accepted (every message is replayed into each prompt)."
    )
    max_sessions_per_key: int | None = Field(
        1000, ge=1, description="Sessions one API key may hold (DELETE /sessions/ID frees one); null = unlimited. "
        "Not applied with auth: none (no key to count by).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy: `raylane run` and the "
                      "rendered Serve config / RayService.")
    route_prefix: str = Field("/", description="Route prefix of the agent app.")

    @model_validator(mode="after")
    def _unique_tools(self):
        names = [t.name for t in self.tools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tool names must be unique; repeated: {', '.join(dup)}")
        servers = [s.name for s in self.mcp_servers]
        dup = sorted({n for n in servers if servers.count(n) > 1})
        if dup:
            raise ValueError(f"mcp_servers names must be unique; repeated: {', '.join(dup)}")
        builtin = set(names) | ({"retrieve"} if self.retrieval else set())
        for i, server in enumerate(self.mcp_servers):
            clash = sorted(set(server.tool_names()) & builtin)
            if clash:
                raise ValueError(f"mcp_servers[{i}] ({server.name}): tool name(s) {', '.join(clash)} are already "
                                 "tools: of this agent; rename the tools: entry or the server")
        return self
