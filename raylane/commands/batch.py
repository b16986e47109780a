"""raylane batch verify OUTPUT: prove every input id is in a batch output exactly once."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.output import json_stdout


def register(sub) -> None:
    p = sub.add_parser("batch", help="batch inference outputs: verify")
    bsub = p.add_subparsers(dest="batch_command", metavar="ACTION")
    bsub.required = True
    v = bsub.add_parser("verify", help="check a batch output: every shard committed and intact, each id once")
    v.add_argument("output", help="the spec's output.path (local folder or s3:// URI)")
    v.add_argument("--no-input", action="store_true", help="skip re-reading the input (use the plan's id digest)")
    add_json(v)
    v.set_defaults(func=_verify)


def _verify(args) -> int:
    import sys

    from runtime.batch import verify_output

    report = verify_output(args.output, check_input=not args.no_input)
    if args.json:
        with json_stdout(True) as emit:
            emit(report)
    else:
        status = "OK" if report.ok else "INCOMPLETE"
        print(f"{status}: {report.output}")
        print(f"  rows in {report.rows_in}, out {report.rows_out}, error {report.rows_error}; "
              f"shards {report.shards_committed}/{report.shards_total} committed")
        for p in report.problems:
            print(f"  - {p}")
        if not report.ok:
            print("  hint: rerun the same spec: it runs the missing shards and re-runs any whose file is "
                  "missing, truncated or corrupt", file=sys.stderr)
    return 0 if report.ok else 1
