"""The checkpoint's on-disk format: checksums over every file (shards in sub-folders too) and
stale temporary folders of killed saves removed."""

import shutil

import numpy as np
import torch

from ddk.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def test_checksums_cover_shard_files_in_sub_folders(tmp_path):
    """Shards live in checkpoint/sharded/; a damaged shard makes the checkpoint unusable."""
    tmp = begin_checkpoint(tmp_path, 4)
    (tmp / "sharded").mkdir()
    (tmp / "sharded" / "__0_0.distcp").write_bytes(b"shard zero")
    (tmp / "sharded" / ".metadata").write_bytes(b"meta")
    final = commit_checkpoint(
        tmp_path, 4, tmp, state={}, arrays={"plan": np.arange(3)}, rng_state={}, keep=2
    )
    assert final.name == "step-00000004" and not tmp.exists()
    assert verify_checkpoint(final) is None
    (final / "sharded" / "__0_0.distcp").write_bytes(b"shard 0ero")
    assert verify_checkpoint(final) == "sharded/__0_0.distcp does not match its checksum"


def test_stale_temp_checkpoint_is_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000003-999").mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(
        tmp_path, 4, model=model, optimizer_state={}, state={}, arrays={}, rng_state={}, keep=2
    )
    assert not (root / ".tmp-step-00000003-999").exists()
    shutil.rmtree(root)
