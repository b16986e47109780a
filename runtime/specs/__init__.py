"""Workload specs: one pydantic model per shape, loaded from YAML by their ``kind:``.

>>> from runtime.specs import load_spec
>>> spec = load_spec("examples/finetune.yaml")                    # doctest: +SKIP
>>> spec = load_spec({"kind": "BatchInference", ...})             # a mapping works too  # doctest: +SKIP
>>> spec = load_spec("examples/serve.yaml", kind=OnlineInferenceSpec)  # refuses other kinds  # doctest: +SKIP

Each spec class declares its shape (``spec.shape``: runner, job module, Serve config, KubeRay
object, sizing, model field; see ``runtime.specs.shape``); ``KINDS`` is derived from the classes.

Every validation problem is collected into one ``SpecError`` that names each bad field by its
path (``resources.num_workers``), says what was expected, and suggests the key you meant.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from runtime.errors import SpecError, SpecProblem
from runtime.specs.agent import AgentSpec
from runtime.specs.batch import BatchInferenceSpec
from runtime.specs.common import Queue, Resources, SpecBase, Storage
from runtime.specs.serving import OnlineInferenceSpec
from runtime.specs.shape import Shape
from runtime.specs.training import FineTuneSpec, TrainingSpec

SPEC_CLASSES: tuple[type[SpecBase], ...] = (
    TrainingSpec, FineTuneSpec, BatchInferenceSpec, OnlineInferenceSpec, AgentSpec,
)
KINDS: dict[str, type[SpecBase]] = {cls.model_fields["kind"].default: cls for cls in SPEC_CLASSES}

Spec = Union[TrainingSpec, FineTuneSpec, BatchInferenceSpec, OnlineInferenceSpec, AgentSpec]

__all__ = [
    "KINDS", "SPEC_CLASSES", "Shape", "Spec", "SpecBase", "Resources", "Storage", "Queue", "TrainingSpec", "FineTuneSpec",
    "BatchInferenceSpec", "OnlineInferenceSpec", "AgentSpec", "load_spec", "parse_spec", "dump_spec",
]


def load_spec(source: str | Path | dict[str, Any] | SpecBase, *, kind: type[SpecBase] | None = None,
              entrypoint: str | None = None) -> Spec:
    """The validated spec from a YAML file path, a mapping or a spec; raises ``SpecError`` listing
    every problem. With ``kind``, a spec of another class is refused too (``entrypoint`` names
    what refuses it, e.g. ``jobs.batch``): the one loader of every entrypoint."""
    if isinstance(source, (str, Path)):
        spec = _load_file(Path(source))
        where = str(source)
    else:
        spec = parse_spec(source, source="args.spec" if isinstance(source, dict) else "<spec>")
        where = "args.spec"
    if kind is not None and not isinstance(spec, kind):
        want, verb = kind.model_fields["kind"].default, "serves" if kind.shape.is_service else "runs"
        other = spec.shape
        use = f"serve_apps.{other.slug}" if other.is_service else f"python -m {other.job_module}"
        raise SpecError(where, [SpecProblem("kind", f"{where} is a {spec.kind} spec; "
                                            f"{entrypoint or 'this entrypoint'} {verb} {want} specs")],
                        hint=f"use {use} for {spec.kind} specs, or `raylane run`")
    return spec


def _load_file(path: Path) -> Spec:
    source = str(path)
    if not path.is_file():
        raise SpecError(source, [SpecProblem("", "file not found")], hint="check the path to the spec YAML")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(source, [SpecProblem("", f"not valid YAML: {where}{problem}")]) from None
    return parse_spec(data, source=source)


def parse_spec(data: Any, source: str = "<spec>") -> Spec:
    """Validate a spec given as a dict (what a notebook builds, or what YAML loads)."""
    if isinstance(data, SpecBase):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise SpecError(source, [SpecProblem("", f"a spec is a mapping with 'kind:' and 'name:', got {type(data).__name__}")])
    kind = data.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        problems = [SpecProblem("kind", _kind_message(kind))]
        if "name" not in data:
            problems.append(SpecProblem("name", "required field is missing"))
        raise SpecError(source, problems)
    try:
        return cls.model_validate(data)  # type: ignore[return-value]
    except ValidationError as e:
        raise SpecError(source, [_problem(cls, err) for err in e.errors()]) from None


def dump_spec(spec: SpecBase) -> dict[str, Any]:
    """The spec as a plain dict (defaults filled in), ready for YAML or JSON. Unset optional
    fields are left out, but a null that turns off a default (``rate_limit: null``) is kept:
    replicas and rendered configs re-parse this dict and must get the same spec."""
    return _keep_null_overrides(spec, spec.model_dump(mode="json", exclude_none=True))


def _keep_null_overrides(model: BaseModel, out: dict[str, Any]) -> dict[str, Any]:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None:
            if field.is_required() or field.get_default(call_default_factory=True) is not None:
                out[name] = None
        elif isinstance(value, BaseModel) and isinstance(out.get(name), dict):
            _keep_null_overrides(value, out[name])
    return out


def _kind_message(kind: Any) -> str:
    valid = ", ".join(KINDS)
    if kind is None:
        return f"required field is missing; one of: {valid}"
    guess = difflib.get_close_matches(str(kind), list(KINDS), n=1, cutoff=0.5)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"unknown kind {kind!r}{hint} (expected one of: {valid})"


def _problem(cls: type[BaseModel], err: dict[str, Any]) -> SpecProblem:
    loc = tuple(err.get("loc", ()))
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        allowed = sorted(_model_at(cls, loc[:-1]).model_fields) if _model_at(cls, loc[:-1]) else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        msg = "unknown field"
        msg += f"; did you mean {guess[0]!r}?" if guess else ""
        if allowed:
            msg += f" (allowed here: {', '.join(allowed)})"
        return SpecProblem(path, msg)
    expected = _expected(cls, loc)
    if kind == "missing":
        return SpecProblem(path, "required field is missing" + (f" ({expected})" if expected else ""))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in err and kind not in ("value_error", "assertion_error"):
        got = repr(err["input"])
        msg += f" (got {got[:60] + '...' if len(got) > 60 else got})"
    return SpecProblem(path, msg)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, Union, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, tuple, dict):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = cls
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        found = _models_in(field.annotation)
        model = found[0] if found else None
    return model


def _expected(cls: type[BaseModel], loc: tuple) -> str:
    if not loc:
        return ""
    parent = _model_at(cls, loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent else None
    if field is None:
        return ""
    return field.description or ""
