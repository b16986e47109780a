"""Training state is read back as data only: a checkpoint store someone else can write must not be
able to run code in the job (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from runtime.training.loop import load_state, lr_lambda


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_the_state_the_loop_saves_loads_back(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))
    # the same keys and value types runtime/training/loop.py writes to state.pt
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": 3,
        "losses": [2.5, 2.1],
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "data_position": {"epoch": 0, "block": 6},
    }
    torch.save(state, tmp_path / "state.pt")
    back = load_state(str(tmp_path / "state.pt"))
    assert back["step"] == 3 and back["losses"] == [2.5, 2.1]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    np.random.set_state(back["rng"]["numpy"])
    restored = np.random.rand()
    np.random.set_state(state["rng"]["numpy"])
    assert restored == np.random.rand()  # the same numpy stream
    random.setstate(back["rng"]["python"])
    opt.load_state_dict(back["optimizer"])
    sched.load_state_dict(back["scheduler"])


def test_a_state_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": 1, "evil": _RunsCode(marker)}, tmp_path / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state(str(tmp_path / "state.pt"))
    assert not marker.exists()
