"""raylane validate SPEC: check a spec without running anything."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.output import json_stdout
from runtime.specs import dump_spec, load_spec


def register(sub) -> None:
    p = sub.add_parser("validate", help="validate a spec YAML and print it with defaults filled in")
    p.add_argument("spec", help="path to the spec YAML")
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    import yaml

    spec = load_spec(args.spec)
    with json_stdout(args.json) as emit:
        if args.json:
            emit({"valid": True, "kind": spec.kind, "name": spec.name, "spec": dump_spec(spec)})
        else:
            print(f"{args.spec}: valid {spec.kind} spec {spec.name!r}")
            print(yaml.safe_dump(dump_spec(spec), sort_keys=False), end="")
    return 0
