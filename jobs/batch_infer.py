"""Alias of ``jobs.batch`` (the name earlier releases documented); same flags and exit codes.

    ray job submit --working-dir . -- python -m jobs.batch_infer --spec examples/batch.yaml
"""

import sys

from jobs.batch import main

if __name__ == "__main__":
    sys.exit(main())
