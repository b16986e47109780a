"""Batch inference: a corpus through Ray Data + vLLM, in deterministic shards that commit
atomically, with a manifest that proves every input id came out exactly once.

>>> from runtime.batch import run_batch, verify_output
>>> result = run_batch(load_spec("examples/batch.yaml"))     # doctest: +SKIP
>>> verify_output(result.output).ok                          # doctest: +SKIP
"""

from runtime.batch.runner import BatchResult, run_batch
from runtime.batch.shards import VerifyReport, verify_output

__all__ = ["BatchResult", "VerifyReport", "run_batch", "verify_output"]
