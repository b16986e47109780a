"""Batch inference as a Ray job (resumable: a rerun skips committed shards).

    ray job submit --working-dir . -- python -m jobs.batch --spec examples/batch.yaml

Prints the result JSON (rows_in, rows_out, rows_error, shards_total, shards_skipped, manifest);
exits 1 if the output is incomplete or another run holds the output folder's lease (``--wait``
waits for it instead), 2 on a bad spec.
"""

import sys

from jobs._common import job_main
from runtime.specs import BatchInferenceSpec


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, BatchInferenceSpec, __doc__, wait=True)


if __name__ == "__main__":
    sys.exit(main())
