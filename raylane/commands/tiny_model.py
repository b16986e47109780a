"""raylane tiny-model DIR [--seed N]: write the embedded random-weight Llama."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.output import json_stdout
from runtime.tiny_model import TinyLlamaConfig, model_fingerprint, write_tiny_model


def register(sub) -> None:
    p = sub.add_parser("tiny-model", help="write raylane's tiny random-weight Llama to DIR")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    with json_stdout(args.json) as emit:
        path = write_tiny_model(args.dir, seed=args.seed, overwrite=True)
        result = {"path": str(path), "seed": args.seed, "fingerprint": model_fingerprint(path),
                  "config": TinyLlamaConfig().__dict__}
        if args.json:
            emit(result)
        else:
            print(f"wrote tiny Llama (seed {args.seed}, fingerprint {result['fingerprint']}) to {path}")
    return 0
