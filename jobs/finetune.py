"""Ray Train LoRA fine-tuning (a FineTune spec) as a Ray job; resumable: rerun the same spec to continue.

    ray job submit --working-dir . -- python -m jobs.finetune --spec examples/finetune.yaml

Prints the result JSON (final_step, resumed_from_step, restarts, eval, checkpoint, registry, gate);
exits 2 on a bad spec, 4 if the gang cannot be placed, 5 if a NaN/gradient guard stopped the run.
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.errors import RaylaneError, UsageError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="path to a FineTune spec YAML")
    p.add_argument("--address", default=None, help="Ray address; default $RAY_ADDRESS or a local cluster")
    p.add_argument("--run-name", default=None,
                   help="start a fresh run under this name instead of resuming the spec's (registry name unchanged)")
    args = p.parse_args(argv)
    try:
        from runtime.specs import load_spec
        from runtime.training import run_finetune

        spec = load_spec(args.spec)
        if spec.kind != "FineTune":
            raise UsageError(f"{args.spec} is a {spec.kind} spec; jobs.finetune runs FineTune specs",
                             hint="use python -m jobs.<shape> for that kind, or `raylane run`")
        if args.run_name:
            spec = spec.model_copy(update={"name": args.run_name, "registry": spec.registry.model_copy(
                update={"model_name": spec.registered_name()})})
        result = run_finetune(spec, address=args.address)
    except RaylaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
