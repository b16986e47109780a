"""Every shipped example spec validates (each shape's own tests run them)."""

from pathlib import Path

import pytest

from runtime.specs import load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert EXAMPLES, "examples/ has no spec"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates(path):
    spec = load_spec(path)
    assert spec.name and spec.kind
