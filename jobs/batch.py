"""Batch inference as a Ray job (resumable: a rerun skips committed shards).

    ray job submit --working-dir . -- python -m jobs.batch --spec examples/batch.yaml

Prints the result JSON (rows_in, rows_out, rows_error, shards_total, shards_skipped, manifest);
exits 1 if the output is incomplete, 2 on a bad spec.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import load_spec_of_kind, run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.batch", description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="path to a BatchInference spec YAML")
    p.add_argument("--address", default=None, help="Ray address; default $RAY_ADDRESS or a local cluster")
    args = p.parse_args(argv)

    def run():
        from runtime.batch import run_batch

        return run_batch(load_spec_of_kind(args.spec, "BatchInference", "jobs.batch"), address=args.address)

    return run_job(run)


if __name__ == "__main__":
    sys.exit(main())
