"""Run any spec: the one function behind ``raylane run`` and ``jobs.*``.

>>> from runtime import load_spec, run
>>> result = run(load_spec("examples/batch.yaml"))       # doctest: +SKIP
>>> result.to_dict()["rows_out"]                          # doctest: +SKIP

Each spec class names its runner (``spec.shape.runner``; see ``runtime.specs.shape``), so there
is no table or shape branch here; runners load their engines only when called.
"""

from __future__ import annotations

from typing import Any

from runtime.specs import SpecBase


def run(spec: SpecBase, *, address: str | None = None, **options: Any):
    """Run ``spec`` locally or on the Ray cluster at ``address``; returns the shape's result object."""
    return spec.shape.runner(spec, address=address, **options)
