"""Drift trigger as a Ray job: evaluate the champion on recent data, fine-tune if it degraded.

    ray job submit --working-dir . -- python -m jobs.drift_check --spec examples/finetune.yaml

The spec is a FineTune spec with a ``drift:`` section. ``--submit-to http://HEAD:8265`` submits the
fine-tune as its own Ray job instead of running it here; ``--dry-run`` only reports.
Prints the result JSON (champion_version, recorded_eval_loss, recent_eval_loss, degradation,
degraded, action, finetune); exits 2 on a bad spec.
"""

import sys

from jobs._common import job_parser, run_job
from runtime.specs import FineTuneSpec, load_spec
from runtime.training import check_drift


def main(argv: list[str] | None = None) -> int:
    p = job_parser(FineTuneSpec, __doc__)
    p.prog = "python -m jobs.drift_check"
    p.add_argument("--submit-to", default=None, help="Ray dashboard URL to submit the fine-tune job to")
    p.add_argument("--dry-run", action="store_true", help="evaluate and report only; never fine-tune")
    args = p.parse_args(argv)

    def run():
        spec = load_spec(args.spec)  # check_drift names what a drift spec needs
        return check_drift(spec, address=args.submit_to or args.address, submit=not args.dry_run,
                           spec_path=args.spec)

    return run_job(run)


if __name__ == "__main__":
    sys.exit(main())
