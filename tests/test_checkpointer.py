"""The checkpointer on its own: a dict of stateful objects, plus a model and its optimizer,
saved into a checkpoint folder and restored into fresh objects (one process)."""

import json
import random

import numpy as np
import pytest
import torch

from ddk.checkpoint import list_checkpoints
from ddk.checkpointer import Checkpointer, RNGState
from ddk.errors import DDKError
from ddk.runtime import Runtime


class Counter:
    """A JSON state with a numpy array, like the trainer's progress and the interval plan."""

    def __init__(self):
        self.count, self.rows = 0, np.zeros((0, 2), dtype=np.int64)

    def state_dict(self):
        return {"count": self.count, "rows": self.rows}

    def check_state_dict(self, state):
        if state.get("count", 0) < 0:
            raise ValueError("a negative count")

    def load_state_dict(self, state):
        self.count, self.rows = state["count"], state["rows"]


def _setup(run_dir, runtime):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    counter = Counter()
    states = {"trainer": counter, "rng": RNGState()}
    checkpointer = Checkpointer(
        run_dir, runtime, model, optimizer, model=model, states=states, keep=2, record={"x": 1}
    )
    return checkpointer, model, optimizer, counter


def test_a_dict_of_states_round_trips_with_model_optimizer_and_rng(tmp_path):
    runtime = Runtime(cpu=True)
    saver, model, optimizer, counter = _setup(tmp_path, runtime)
    counter.count, counter.rows = 7, np.arange(6).reshape(3, 2)
    random.seed(3)
    folder = saver.save(7)
    expected = (random.random(), torch.rand(2))  # what the RNGs give after the save
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7]
    assert json.loads((folder / "trainer_state.json").read_text())["x"] == 1
    assert (folder / "rows.npy").is_file()

    loader, fresh_model, fresh_optimizer, fresh = _setup(tmp_path, runtime)
    with torch.no_grad():
        fresh_model.weight.zero_()
    loader.load(folder)
    assert fresh.count == 7 and np.array_equal(fresh.rows, counter.rows)
    torch.testing.assert_close(fresh_model.weight, model.weight)
    torch.testing.assert_close(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"],
        optimizer.state_dict()["state"][0]["exp_avg"],
    )
    # the RNGs continue from where they were at the save
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])


def test_a_state_refuses_a_checkpoint_before_anything_loads(tmp_path):
    runtime = Runtime(cpu=True)
    saver, model, _, counter = _setup(tmp_path, runtime)
    counter.count = -1
    folder = saver.save(1)
    loader, fresh_model, _, _ = _setup(tmp_path, runtime)
    before = fresh_model.weight.detach().clone()
    with pytest.raises(DDKError, match="cannot resume .*a negative count"):
        loader.load(folder)
    assert torch.equal(fresh_model.weight, before)  # refused before the weights were read
