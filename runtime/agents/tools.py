"""Tools: plain Python functions with a JSON schema for their arguments.

>>> from runtime.agents.tools import calculator
>>> calculator(expression="2 * (3 + 4)")
'14'

A tool is ``module:function`` in the spec. Its argument schema comes from the spec's
``parameters`` or the function's ``PARAMETERS`` attribute; the model's call is validated against
it before the tool runs. Tools run in processes beside the session workers, or in Ray tasks
(see ``runtime.agents.toolrun``), so they must be importable on the workers, and their return
value is shown to the model as text.
"""

from __future__ import annotations

import ast
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import RaylaneError
from runtime.imports import load_callable

_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


_MAX_BITS = 4096  # results up to ~1200 digits


def _bits(x: float) -> int:
    # Only ints grow without bound; a float overflows to an error or inf in fixed memory.
    return abs(x).bit_length() if isinstance(x, int) else 0


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses)."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or _bits(left) * abs(right) > _MAX_BITS):
                raise ValueError("exponent too large")  # (9**64)**64... would take the worker's memory
            if isinstance(node.op, ast.Mult) and _bits(left) + _bits(right) > _MAX_BITS:
                raise ValueError("result too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported syntax: {ast.dump(node)[:40]}")

    try:
        value = ev(ast.parse(expression.strip(), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expression!r} ({e.msg})") from None
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if value.is_integer() else repr(value)


# A pattern keeps even a random model's expressions arithmetic (vLLM guides the string too).
calculator.PARAMETERS = {
    "type": "object",
    "properties": {"expression": {"type": "string", "pattern": "^-?[0-9]{1,6}( ?[-+*/] ?[0-9]{1,6}){0,4}$",
                                  "description": "e.g. 2 * (3 + 4)"}},
    "required": ["expression"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Tool:
    """A tool as the orchestrator sees it (picklable: the function is imported where it runs)."""

    name: str
    import_path: str
    description: str
    parameters: dict[str, Any]
    timeout_s: float = 10.0
    retries: int = 1
    max_concurrency: int = 4
    num_cpus: float = 0.0
    bound: dict[str, Any] = field(default_factory=dict)  # extra keywords the model never sees
    kind: str = "tool"  # "tool" or "retrieval" (names the span)
    side_effects: bool = False  # runs only in sessions created with allow_tools naming it
    mcp_server: str | None = None  # served by this MCP server (runtime.agents.mcptools), not imported
    mcp_tool: str | None = None  # the server's own name for it
    requires_approval: bool = False  # each call waits for a person's decision (POST /sessions/ID/approvals)
    idempotent: bool = False  # deduplicates by its idempotency key: safe to re-send after a crash
    takes_key: bool = False  # the function accepts an ``idempotency_key`` keyword (MCP: always, in _meta)
    isolation: str = "process"  # process, thread or ray_task (runtime.agents.toolrun)


KEY_ARGUMENT = "idempotency_key"  # the keyword a Python tool declares to receive its call's key


def takes_key(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts the ``idempotency_key`` keyword (by name or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == KEY_ARGUMENT or p.kind == p.VAR_KEYWORD for p in params)


def import_function(import_path: str) -> Callable[..., Any]:
    return load_callable(import_path, field="tools[].import_path",
                         hint="the module must be importable where the agent runs (on a cluster: in the working_dir or image)")


def schema_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """An argument schema from type hints, for tools that declare none."""
    kinds = {str: "string", int: "integer", float: "number", bool: "boolean"}
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name.startswith("_") or p.name == KEY_ARGUMENT:
            continue
        ann = p.annotation if not isinstance(p.annotation, str) else {"str": str, "int": int, "float": float, "bool": bool}.get(p.annotation)
        props[p.name] = {"type": kinds.get(ann, "string")}
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def load_tools(tool_specs: list, retrieval: Any | None = None, index_uri: str | None = None) -> list[Tool]:
    """Tools from the spec's ``tools:`` (and the retrieval tool), with their schemas checked."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    tools = []
    for i, t in enumerate(tool_specs):
        fn = import_function(t.import_path)
        params = t.parameters or getattr(fn, "PARAMETERS", None) or schema_from_signature(fn)
        try:
            Draft202012Validator.check_schema(params)
        except SchemaError as e:
            raise RaylaneError(f"tools[{i}].parameters is not a valid JSON schema: {e.message}") from None
        desc = t.description or (inspect.getdoc(fn) or t.name).splitlines()[0]
        tools.append(Tool(t.name, t.import_path, desc, params, t.timeout_s, t.retries, t.max_concurrency, t.num_cpus,
                          side_effects=t.side_effects, requires_approval=t.requires_approval,
                          idempotent=t.idempotent, takes_key=takes_key(fn), isolation=t.isolation))
    if retrieval is not None:
        # Imported here: retrieval needs pyarrow (~1 s), which a tool process running only the
        # calculator should not load.
        from runtime.agents.retrieval import RETRIEVE_PARAMETERS

        tools.append(Tool(
            "retrieve", "runtime.agents.retrieval:retrieve",
            "Search the document index; returns the best matching passages or 'no results'.",
            RETRIEVE_PARAMETERS, timeout_s=30.0, retries=1, max_concurrency=8, num_cpus=0.0,
            bound={"_index": index_uri, "_top_k": retrieval.top_k, "_min_score": retrieval.min_score,
                   "_dim": retrieval.dim},
            kind="retrieval",
        ))
    return tools
