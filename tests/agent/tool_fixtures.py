"""Tools for the tool-runner tests (imported by import path in tool processes)."""

from __future__ import annotations

import os
import time


def pid() -> int:
    return os.getpid()


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return f"slept {seconds:g}"


def crash() -> None:
    os._exit(3)


def chatty(text: str) -> str:
    print("a tool that prints must not break the protocol", text)
    return text.upper()


def boom(text: str) -> str:
    raise ValueError(f"no {text}")


def unpicklable() -> object:
    return lambda: None
