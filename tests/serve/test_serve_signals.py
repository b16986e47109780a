"""`raylane run` stops cleanly on SIGINT even when it inherited SIGINT ignored (a background job
of a non-interactive shell, e.g. CI), and on SIGTERM (kill, supervisors, Kubernetes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

# Ray Serve is imported before "serving" is printed: on a loaded machine its import takes seconds,
# and a signal sent then would meet the inherited SIG_IGN (a real `raylane run` has imported it long
# before it waits).
# The process joins no cluster (serve_until_interrupted then leaves Serve alone): the suite's own
# local cluster may be up, and its Serve must not be shut down from here.
SERVER = """
import sys
from ray import serve
from runtime.serving.deploy import serve_until_interrupted
import ray
assert not ray.is_initialized()
print("serving", flush=True)
serve_until_interrupted(lambda msg: print(msg, flush=True), on_exit=lambda: print("on_exit ran", flush=True))
print("returned", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint-inherited-ignored", "sigterm"])
def test_serving_stops_and_cleans_up_on_a_signal(sig):
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout.readline().strip() == "serving"
        time.sleep(1.5)  # inside the wait loop
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "interrupted; shutting down" in out and "on_exit ran" in out and "returned" in out, out
