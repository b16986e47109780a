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
    p.add_argument("--wait", action="store_true",
                   help="BatchInference: if another run is writing the output folder, wait for it instead of exiting")
    p.set_defaults(func=_run)


def _run(args) -> int:
    spec = load_spec(args.spec)
    options = {}
    if args.wait:
        if spec.kind != "BatchInference":
            from runtime.errors import RaylaneError

            raise RaylaneError(f"--wait applies to BatchInference specs, not {spec.kind}", hint="drop --wait")
        options["wait"] = True  # queue behind the run that holds the output folder's lease
    with json_stdout(args.json) as emit:
        result = run(spec, address=args.address, **options)
        emit(result)
        ok = getattr(result, "ok", True)
    return 0 if ok else 1
