"""Stage one model onto the weight-cache PVC (run by the staging Job or the head's init container).

    python -m jobs.stage_weights --model tiny --dest /mnt/weights/tiny-8950abfd

Idempotent and atomic (``runtime.models.stage_model``): a second run of the same model does
nothing, and a crash leaves no half-staged folder that pods would trust.
"""

from __future__ import annotations

import argparse
import sys

from runtime.defaults import DEFAULT_STORAGE_ROOT
from runtime.models import stage_model

stage = stage_model  # the name earlier releases exported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.stage_weights", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--storage-root", default=DEFAULT_STORAGE_ROOT)
    args = p.parse_args(argv)
    stage_model(args.model, args.dest, args.storage_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
