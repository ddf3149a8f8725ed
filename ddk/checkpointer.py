"""Saving and restoring a run: a dict of stateful objects (each with `state_dict` /
`load_state_dict`) plus the model and optimizer, as torchtitan's CheckpointManager does.

    checkpointer = Checkpointer(run_dir, runtime, module, optimizer, model=student, keep=2,
                                states={"trainer": progress, "plan": plan,
                                        "scheduler": schedule, "rng": RNGState()},
                                record={"config": ..., "data_fingerprint": ...})
    checkpointer.save(step)          # every rank calls it
    checkpointer.load(folder)        # every rank calls it

A state's JSON values go into trainer_state.json under its name (`checkpoint.RECORD_OF` keeps
format 1's layout), its numpy arrays into <key>.npy (and back to the state whose state_dict
has that key), and the "rng" state into rng.pt. The model
and optimizer go through the runtime: written whole by rank 0, or sharded by every rank. A
state may refuse a checkpoint it cannot continue (`check_state_dict`, raising ValueError)
before anything is loaded.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ddk.checkpoint import (
    RECORD_OF,
    begin_checkpoint,
    commit_checkpoint,
    load_checkpoint,
    read_state,
    saved_geometry,
    sharded_states_dir,
)
from ddk.errors import DDKError

RNG = "rng"


class RNGState:
    """Python, numpy, torch and CUDA random states."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = state["numpy"]
        np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            # Rank 0 saved every GPU it saw; a resume on a smaller node sees fewer.
            torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        runtime,
        module: torch.nn.Module,
        optimizer,
        *,
        model: torch.nn.Module,
        states: dict,
        keep: int,
        record: dict,
    ):
        self.run_dir, self.runtime = run_dir, runtime
        self.module, self.optimizer, self.model = module, optimizer, model
        self.states, self.keep, self.record = states, keep, record

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> Path | None:
        """Checkpoint `step` (a collective): every rank writes its sharded states, if any, into
        rank 0's temporary folder; rank 0 then adds the rest, the checksums, and renames it
        into place. Returns the folder on rank 0."""
        rt = self.runtime
        rt.barrier()
        tmp = rt.broadcast_object(begin_checkpoint(self.run_dir, step) if rt.is_main else None)
        rt.save_states(tmp, self.module, self.optimizer)
        rt.barrier()
        path = None
        if rt.is_main:
            state, arrays = self._split_states()
            path = commit_checkpoint(
                self.run_dir,
                step,
                tmp,
                state={**state, **self.record},
                arrays=arrays,
                rng_state=self.states[RNG].state_dict(),
                keep=self.keep,
                **rt.whole_states(self.model, self.optimizer),
            )
        rt.barrier()
        return path

    def _split_states(self) -> tuple[dict, dict]:
        """The states' JSON records (by record name) and their numpy arrays (by key)."""
        records: dict[str, dict] = {}
        arrays: dict[str, np.ndarray] = {}
        for name, obj in self.states.items():
            if name == RNG:
                continue
            for key, value in obj.state_dict().items():
                if isinstance(value, np.ndarray):
                    arrays[key] = value
                else:
                    records.setdefault(RECORD_OF.get(name, name), {})[key] = value
        return records, arrays

    # ------------------------------------------------------------------ load
    def load(self, folder: Path) -> None:
        """Restore every state, the model and the optimizer from `folder` (a collective).
        Whatever refuses the checkpoint does so in one line before anything is loaded."""
        saved = read_state(folder)
        for name, obj in self.states.items():
            if name != RNG and hasattr(obj, "check_state_dict"):
                self._resume_error(obj.check_state_dict, saved.get(RECORD_OF.get(name, name), {}))
        states = sharded_states_dir(folder)
        processes = saved_geometry(saved).get("processes", self.runtime.world_size)
        self.runtime.check_resumable(folder, states, processes)
        loaded = load_checkpoint(folder, None if states is not None else self.model, self.device)
        if states is not None:
            self.runtime.load_states(states, self.module, self.optimizer)
        else:
            self.optimizer.load_state_dict(loaded["optimizer"])
        for name, obj in self.states.items():
            if name == RNG:
                continue
            record = loaded["state"].get(RECORD_OF.get(name, name), {})
            # each state gets back the arrays it saves (`<key>.npy` for a key it has)
            arrays = {k: v for k, v in loaded["arrays"].items() if k in obj.state_dict()}
            self._resume_error(obj.load_state_dict, {**record, **arrays})
        self.states[RNG].load_state_dict(loaded["rng"])

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def _resume_error(self, fn, state: dict) -> None:
        try:
            fn(state)
        except ValueError as e:  # e.g. a checkpoint from before data fingerprints were stored
            raise DDKError(f"cannot resume '{self.run_dir}': {e}") from None


@dataclass
class TrainState:
    """The run's progress, as a checkpoint restores it (the interval plan has its own state)."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    before: dict = field(default_factory=dict)  # student perplexity on the report split at step 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
