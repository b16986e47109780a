"""raylane run SPEC: run a spec on a local Ray cluster (or --address)."""

from __future__ import annotations

from raylane.commands._common import add_address, add_json
from raylane.output import json_stdout
from runtime.run import run
from runtime.specs import load_spec


def register(sub) -> None:
    p = sub.add_parser("run", help="run a spec: train, fine-tune, batch, serve or agent")
    p.add_argument("spec", help="path to the spec YAML")
    add_address(p)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    spec = load_spec(args.spec)
    with json_stdout(args.json) as emit:
        result = run(spec, address=args.address)
        emit(result)
        ok = getattr(result, "ok", True)
    return 0 if ok else 1
