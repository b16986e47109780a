"""A rollout's quality probe: a golden set sent through the live endpoint to each arm, scored.

>>> from runtime.release.probe import exact_match
>>> exact_match([" Paris", "4"], ["Paris", "5"])
0.5

Once per step the controller (``runtime.release.controller``) sends every golden prompt to
``/v1/completions`` under the stable model id, greedy, once pinned to the champion and once to
the candidate (``x-raylane-arm`` with the rollout's probe token, see ``runtime.serving.canary``;
pinned requests are not counted in the live windows). The metric (``checks.quality.metric``,
loaded like ``eval.metric``) scores each arm's completions against the references; the scores
are the arms' ``quality`` in the step's decision (``runtime.release.decide``) and its record.
They are saved next to the step's windows, so a restarted controller does not probe the step
again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from runtime import storage
from runtime.errors import RaylaneError

ARMS = ("champion", "candidate")
PROBE_KEY_ENV = "RAYLANE_PROBE_API_KEY"
FIELD = "rollout.checks.quality"


def exact_match(completions: list[str], references: list[str]) -> float:
    """The share of completions equal to their reference (whitespace at the ends ignored)."""
    if not references:
        return 0.0
    return sum(c.strip() == r.strip() for c, r in zip(completions, references)) / len(references)


def read_golden_set(uri: str) -> list[dict[str, str]]:
    """The golden set's rows (``prompt``, ``reference``); a RaylaneError naming the line otherwise."""
    try:
        text = storage.read_bytes(uri).decode()
    except (OSError, FileNotFoundError) as e:
        raise RaylaneError(f"{FIELD}.golden_set: cannot read {uri!r} ({e})",
                           hint="point it at a JSONL file the rollout controller can read (a path on "
                                "shared storage or s3://)") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("reference"), str)):
            raise RaylaneError(f"{FIELD}.golden_set: line {n} of {uri} is not "
                               '{"prompt": "...", "reference": "..."}',
                               hint="one JSON object per line, both values strings")
        rows.append(row)
    if not rows:
        raise RaylaneError(f"{FIELD}.golden_set: {uri} has no rows", hint='add {"prompt": ..., "reference": ...} lines')
    return rows


def probe_api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The key the probe sends: ``$RAYLANE_PROBE_API_KEY``, else the first of the keys the
    replicas accept (``$RAYLANE_API_KEYS`` / ``$RAYLANE_API_KEYS_FILE``); None when there is none."""
    from runtime.errors import AuthNotConfigured
    from runtime.serving.keys import load_api_keys

    env = os.environ if environ is None else environ
    if env.get(PROBE_KEY_ENV):
        return env[PROBE_KEY_ENV]
    try:
        return sorted(load_api_keys(env))[0]
    except AuthNotConfigured:
        return None


def run_probe(state, quality, *, api_key: str | None = None, client=None, timeout_s: float = 60.0) -> dict[str, Any]:
    """Score both arms of ``state`` (a ``RolloutState``) on ``quality``'s golden set (a
    ``QualityProbeSpec``): ``{"champion": score, "candidate": score, "prompts": n, "s": seconds}``."""
    import httpx

    from runtime.imports import load_callable

    rows = read_golden_set(quality.golden_set)
    metric = load_callable(quality.metric, field=f"{FIELD}.metric")
    endpoint = (quality.endpoint or "").rstrip("/")
    headers = {"x-raylane-probe": state.probe_token}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    own = client is None
    client = client or httpx.Client(timeout=timeout_s)
    start = time.monotonic()
    result: dict[str, Any] = {}
    try:
        for arm in ARMS:
            completions = []
            for i, row in enumerate(rows):
                body = {"model": state.model_id, "prompt": row["prompt"], "max_tokens": quality.max_tokens,
                        "temperature": 0}
                try:
                    r = client.post(f"{endpoint}/v1/completions", json=body, headers={**headers, "x-raylane-arm": arm})
                except httpx.HTTPError as e:
                    raise RaylaneError(f"quality probe: {endpoint} unreachable ({type(e).__name__}: {e})",
                                       hint=f"set {FIELD}.endpoint to the app's URL as the controller's node "
                                            "reaches it") from None
                if r.status_code != 200:
                    raise RaylaneError(f"quality probe: golden prompt {i + 1} on the {arm} got HTTP "
                                       f"{r.status_code}: {r.text[:200]}")
                # A replica that has not read this rollout's state yet serves no arm, or an arm of
                # the rollout before (another version): the probe tries again next turn.
                got = (r.headers.get("x-raylane-arm"), r.headers.get("x-raylane-model-version"))
                if got != (arm, getattr(state, arm)):
                    raise RaylaneError(f"quality probe: the {arm} ({getattr(state, arm)}) was pinned but "
                                       f"{' '.join(g for g in got if g) or 'no arm'} served golden prompt {i + 1}")
                completions.append(r.json()["choices"][0]["text"])
            try:
                score = metric(completions, [row["reference"] for row in rows])
            except Exception as e:
                raise RaylaneError(f"{FIELD}.metric: {quality.metric} raised {type(e).__name__}: {e}",
                                   hint="fn(completions: list[str], references: list[str]) -> float") from None
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise RaylaneError(f"{FIELD}.metric: {quality.metric} returned {score!r}, not a number",
                                   hint="fn(completions, references) -> float, higher is better")
            result[arm] = float(score)
    finally:
        if own:
            client.close()
    return {**result, "prompts": len(rows), "s": round(time.monotonic() - start, 3)}


def scores_path(storage_root: str, state) -> str:
    return storage.join(storage_root, "rollouts", state.app, "windows", state.rollout_id,
                        f"quality-step-{state.step:03d}.json")


def step_scores(storage_root: str, state, quality, **probe_kwargs) -> dict[str, Any]:
    """The probe's scores for ``state``'s current step: saved ones, else probed now and saved."""
    path = scores_path(storage_root, state)
    if storage.exists(path):
        return json.loads(storage.read_bytes(path))
    scores = run_probe(state, quality, **probe_kwargs)
    storage.write_bytes_atomic(path, json.dumps(scores).encode())
    return scores
