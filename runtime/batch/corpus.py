"""A deterministic sample corpus (``examples/data/corpus.jsonl`` is ``sample_corpus(1000)``).

>>> from runtime.batch.corpus import sample_corpus
>>> rows = sample_corpus(10)
>>> rows[0]["id"]
'doc-00000'

A few rows are outliers on purpose, so every run shows the error-row path: an empty prompt, a
null prompt, and one prompt far longer than the example spec's ``max_prompt_tokens``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["ray", "shards", "vllm", "kubernetes", "lora", "tokens", "manifests", "gpus", "queues", "agents"]
VERBS = ["explain", "summarize", "list three facts about", "write a haiku about", "compare two kinds of"]


def sample_corpus(n: int = 1000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt: str | None = f"{rng.choice(VERBS).capitalize()} {rng.choice(TOPICS)} in {rng.randint(2, 40)} words."
        if n >= 10 and i == 3:
            prompt = ""
        elif n >= 10 and i == 7:
            prompt = None
        elif n >= 10 and i == 9:
            prompt = " ".join(rng.choice(TOPICS) for _ in range(400))
        rows.append({"id": f"doc-{i:05d}", "prompt": prompt})
    return rows


def write_corpus(path: str | Path, n: int = 1000, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in sample_corpus(n, seed)))
    return path
