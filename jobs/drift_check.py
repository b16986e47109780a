"""Drift trigger as a Ray job: evaluate the champion on recent data, fine-tune if it degraded.

    ray job submit --working-dir . -- python -m jobs.drift_check --spec examples/finetune.yaml

The spec is a FineTune spec with a ``drift:`` section. ``--submit-to http://HEAD:8265`` submits the
fine-tune as its own Ray job instead of running it here; ``--dry-run`` only reports.
Prints the result JSON (champion_version, recorded_eval_loss, recent_eval_loss, degradation,
degraded, action, finetune); exits 2 on a bad spec.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.drift_check", description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="path to a FineTune spec YAML with a drift: section")
    p.add_argument("--address", default=None, help="Ray address; default $RAY_ADDRESS or a local cluster")
    p.add_argument("--submit-to", default=None, help="Ray dashboard URL to submit the fine-tune job to")
    p.add_argument("--dry-run", action="store_true", help="evaluate and report only; never fine-tune")
    args = p.parse_args(argv)

    def run():
        from runtime.specs import load_spec
        from runtime.training import check_drift

        return check_drift(load_spec(args.spec), address=args.submit_to or args.address,
                           submit=not args.dry_run, spec_path=args.spec)

    return run_job(run)


if __name__ == "__main__":
    sys.exit(main())
