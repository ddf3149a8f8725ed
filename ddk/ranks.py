"""Which process this is: the one answer to "am I rank 0?", and the one rank-0 print.

Under `torchrun` / `accelerate launch` the rank is the process group's once it exists, and the
launcher's RANK variable before that (a run folder is locked before any model loads), so the
same question gets the same answer at every point of a run.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    """This process's global rank (0 without a distributed launch)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """`print` on global rank 0 only: every rank runs the same code, one line reaches the user."""
    if is_main():
        print(*args, **kwargs)
