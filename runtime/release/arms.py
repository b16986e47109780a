"""Sticky weighted arm choice: which arm (champion or candidate) serves a client in a step.

>>> from runtime.release.arms import choose_arm
>>> choose_arm("key-digest-1", "r1", step=0, weight=0)
'champion'
>>> choose_arm("key-digest-1", "r1", step=0, weight=100)
'candidate'

A hash bucket in [0, 100) of (rollout id, step, client): the same client gets the same arm for
the whole step on every replica (no shared state), and over many clients the candidate's share
is the weight. The step is part of the hash, so each step draws a fresh sample of clients: one
unusual client cannot sit in the candidate's window for the whole rollout.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Arm = Literal["champion", "candidate"]


def bucket(client: str, rollout_id: str, step: int) -> float:
    """A uniform number in [0, 100) fixed by (rollout id, step, client)."""
    digest = hashlib.sha256(f"{rollout_id}\x00{step}\x00{client}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def choose_arm(client: str, rollout_id: str, step: int, weight: float) -> Arm:
    """``candidate`` for a ``weight`` percent share of clients, ``champion`` for the rest.
    ``client``: the API key's digest (never the key itself) or another stable client id."""
    return "candidate" if bucket(client, rollout_id, step) < weight else "champion"
