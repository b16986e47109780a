"""`make bench`: every benchmark, one after another, each in its own process (each starts its own
engines and Ray cluster). Each prints a markdown table comparing raylane with the bare engine.

    python -m bench                 # all
    python -m bench train batch     # some
    python -m bench train-data      # training data: memory and start-up against corpus size
    python -m bench batch-scale     # batch: driver memory and time to first commit against corpus size
"""

import subprocess
import sys

BENCHES = ["train", "train-data", "batch", "batch-scale", "serve", "guard", "agent"]


def main(argv: list[str]) -> int:
    chosen = argv or BENCHES
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHES}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n## bench.{name}\n", flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.{name.replace('-', '_')}"]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
