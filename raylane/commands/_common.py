"""Flags and helpers shared by subcommands."""

from __future__ import annotations

import argparse

from runtime.errors import UsageError


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to attach to (HOST:PORT or ray://HOST:10001); default $RAY_ADDRESS, else a new local cluster",
    )


def yes_no(value: str | None, flag: str) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1"):
        return True
    if v in ("no", "n", "false", "0"):
        return False
    raise UsageError(f"{flag} takes yes or no, got {value!r}")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose", "-v", action="store_true",
        help="stream Ray's, Serve's, HAProxy's and vLLM's logs here (default: a log file, its path printed)",
    )
