"""Example agent tools (referenced by import path from examples/agent.yaml and the tests).

A tool is a plain function: keyword arguments in, a JSON-able value or text out; raise to fail.
``PARAMETERS`` is the JSON schema of the arguments (vLLM guides the model's call with it).
"""

from __future__ import annotations

import time


def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


word_count.PARAMETERS = {
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 60}},
    "required": ["text"],
    "additionalProperties": False,
}


def slow_lookup(key: str) -> str:
    """Look a key up in a slow backend (sleeps 30 s: shows tool timeouts and cancellation)."""
    time.sleep(30)
    return f"value of {key}"


slow_lookup.PARAMETERS = {
    "type": "object",
    "properties": {"key": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
    "required": ["key"],
    "additionalProperties": False,
}


def inventory(item: str) -> int:
    """Units of an item in stock (the backend is down: always fails, shows tool-failure budgets)."""
    raise ConnectionError(f"inventory backend unreachable while looking up {item!r}")


inventory.PARAMETERS = {
    "type": "object",
    "properties": {"item": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
    "required": ["item"],
    "additionalProperties": False,
}


def append_line(file: str, text: str, idempotency_key: str | None = None) -> str:
    """Append a line to a file (a side effect: each run adds one line, key first).

    The runtime passes ``idempotency_key`` (the same for every retry of one call); a tool that
    must not repeat an effect would look the key up before acting. This one does not, so
    tests can count how often it really ran.
    """
    with open(file, "a") as f:
        f.write(f"{idempotency_key}\t{text}\n")
    return f"appended {text!r}"


def append_line_parameters(file: str) -> dict:
    """``append_line``'s schema with the file fixed (a const the model cannot change)."""
    return {"type": "object", "additionalProperties": False, "required": ["file", "text"],
            "properties": {"file": {"const": file}, "text": {"type": "string", "pattern": "^[a-z]{1,8}$"}}}
