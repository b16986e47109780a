"""What every job entrypoint shares: parse ``--spec``, load it as its shape, run it, print the
result JSON on stdout, and map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from runtime.errors import RaylaneError
from runtime.specs import SpecBase, load_spec


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


def job_parser(spec_class: type[SpecBase], doc: str) -> argparse.ArgumentParser:
    """``--spec`` and ``--address``, the flags of every ``python -m jobs.<slug>``."""
    shape = spec_class.shape
    kind = spec_class.model_fields["kind"].default
    p = argparse.ArgumentParser(prog=f"python -m {shape.job_module}", description=doc.splitlines()[0])
    p.add_argument("--spec", required=True, help=f"path to a {kind} spec YAML")
    p.add_argument("--address", default=None, help="Ray address; default $RAY_ADDRESS or a local cluster")
    return p


def job_main(argv: list[str] | None, spec_class: type[SpecBase], doc: str, *, run_name: bool = False,
             wait: bool = False) -> int:
    """``python -m jobs.<slug> --spec S.yaml``: the spec's own runner (``spec.shape.runner``).
    ``run_name`` adds ``--run-name`` (training shapes: a fresh run under another name); ``wait``
    adds ``--wait`` (batch: queue behind the run holding the output folder's lease)."""
    p = job_parser(spec_class, doc)
    if wait:
        p.add_argument("--wait", action="store_true",
                       help="if another run is writing the output folder, wait for it instead of exiting")
    if run_name:
        p.add_argument("--run-name", default=None,
                       help="start a fresh run under this name instead of resuming the spec's (registry name unchanged)")
    args = p.parse_args(argv)

    def run():
        spec = load_spec(args.spec, kind=spec_class, entrypoint=spec_class.shape.job_module)
        if getattr(args, "run_name", None):
            spec = spec.with_run_name(args.run_name)
        options = {"wait": True} if getattr(args, "wait", False) else {}
        return spec.shape.runner(spec, address=args.address, **options)

    return run_job(run)
