"""The classifier on the seeds' production examples, through the CLI's JSON."""

import json

import pytest

from runtime.classify import classify
from tests.conftest import run_cli

SEEDS = [
    # (example, CLI answers, shape, scheduler, queue starts with)
    ("pre-training an in-house foundation model",
     ["--new-artifact", "yes", "--same-architecture", "no", "--gpu-heavy", "yes", "--hours", "720"],
     "training", "gang", "kueue"),
    ("a per-customer LoRA adapter on a base LLM",
     ["--new-artifact", "yes", "--same-architecture", "yes", "--gpu-heavy", "no", "--hours", "1"],
     "fine-tuning", "gang", "kueue"),
    ("nightly enrichment of a customer record table",
     ["--new-artifact", "no", "--fan-out", "no", "--gpu-heavy", "yes", "--hours", "3"],
     "batch-inference", "default", "kueue"),
    ("a fraud-detection scorer",
     ["--new-artifact", "no", "--latency-budget-ms", "50", "--fan-out", "no"],
     "online-inference", "default", "none"),
    ("a customer-support copilot querying a knowledge base and a ticketing API",
     ["--new-artifact", "no", "--latency-budget-ms", "3000", "--fan-out", "yes"],
     "agent", "default", "none"),
]


@pytest.mark.parametrize("example,answers,shape,scheduler,queue", SEEDS, ids=[s[0][:30] for s in SEEDS])
def test_seed_examples(example, answers, shape, scheduler, queue):
    r = run_cli("classify", "--json", *answers)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["shape"] == shape
    assert d["scheduler"] == scheduler
    assert d["queue"].startswith(queue)
    assert d["runtime"] and d["reason"]


def test_unsettled_answers_default_to_batch_and_say_why():
    d = classify()
    assert d.shape == "batch-inference" and "do not settle" in d.reason
    d = classify(new_artifact=True)
    assert d.shape == "batch-inference" and "--same-architecture" in d.reason


def test_question_order_artifact_wins_over_latency():
    # Question 1 is asked first: a new artifact is training/fine-tuning even with a latency budget.
    assert classify(new_artifact=True, same_architecture=True, latency_budget_ms=20).shape == "fine-tuning"


def test_loose_latency_budget_is_batch():
    assert classify(new_artifact=False, latency_budget_ms=3_600_000).shape == "batch-inference"


def test_bad_yes_no_is_a_usage_error():
    r = run_cli("classify", "--json", "--fan-out", "maybe")
    assert r.returncode == 2 and "--fan-out takes yes or no" in r.stderr
