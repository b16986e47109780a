"""The ``raylane`` command. Each subcommand lives in ``raylane/commands/<name>.py`` and is a thin
layer over a public function in ``runtime`` (or ``cluster``); this file only wires them up and
turns user errors into messages and exit codes (a traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import raylane.commands as commands_pkg
from runtime.errors import RaylaneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylane",
        description="Training, LoRA fine-tuning, batch inference, online inference and agents on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"raylane.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except RaylaneError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
