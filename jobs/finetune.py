"""Ray Train LoRA fine-tuning (a FineTune spec) as a Ray job; resumable: rerun the same spec to continue.

    ray job submit --working-dir . -- python -m jobs.finetune --spec examples/finetune.yaml

Prints the result JSON (final_step, resumed_from_step, restarts, eval, checkpoint, registry, gate);
exits 2 on a bad spec, 4 if the gang cannot be placed, 5 if a NaN/gradient guard stopped the run.
"""

import sys

from jobs._common import job_main
from runtime.specs import FineTuneSpec


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, FineTuneSpec, __doc__, run_name=True)


if __name__ == "__main__":
    sys.exit(main())
