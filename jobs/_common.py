"""What every job entrypoint shares: run, print the result JSON on stdout, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from runtime.errors import RaylaneError, UsageError


def run_job(fn: Callable[[], Any]) -> int:
    """``fn()`` returns a result with ``to_dict()`` and ``ok``: print it, exit 0 only if ok.
    A RaylaneError prints one ``error:`` line (no traceback) and exits with its code."""
    try:
        result = fn()
    except RaylaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


def load_spec_of_kind(path: str, kind: str, module: str):
    """The spec at ``path``; a UsageError (exit 2) when it is not a ``kind`` spec."""
    from runtime.specs import load_spec

    spec = load_spec(path)
    if spec.kind != kind:
        raise UsageError(f"{path} is a {spec.kind} spec; {module} runs {kind} specs",
                         hint="use python -m jobs.<shape> for that kind, or `raylane run`")
    return spec


def training_main(argv: list[str] | None, *, module: str, kind: str, runner: str, doc: str) -> int:
    """``python -m jobs.train`` and ``jobs.finetune``: the same flags, resume and result for a
    Training or FineTune spec; ``runner`` names the function in ``runtime.training``."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    p.add_argument("--spec", required=True, help=f"path to a {kind} spec YAML")
    p.add_argument("--address", default=None, help="Ray address; default $RAY_ADDRESS or a local cluster")
    p.add_argument("--run-name", default=None,
                   help="start a fresh run under this name instead of resuming the spec's (registry name unchanged)")
    args = p.parse_args(argv)

    def run():
        import runtime.training

        spec = load_spec_of_kind(args.spec, kind, module)
        if args.run_name:
            spec = spec.model_copy(update={"name": args.run_name, "registry": spec.registry.model_copy(
                update={"model_name": spec.registered_name()})})
        return getattr(runtime.training, runner)(spec, address=args.address)

    return run_job(run)
