"""A full disk: one line, exit 2, the last good checkpoint (or final model) kept whole, and the
run resumes once space is freed. Needs a tmpfs (root); skipped where none can be mounted."""

import subprocess

import numpy as np
import pytest
import torch

from ddk.checkpoint import (
    checkpoint_bytes,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from ddk.cli import main
from ddk.errors import DDKError
from tests.conftest import (
    one_error_line,
    tree_digest,
    world_config,
)


@pytest.fixture
def small_tmpfs(tmp_path, mount_tmpfs):
    return mount_tmpfs(tmp_path / "tmpfs", "size=256k")


def test_disk_full_during_checkpoint_keeps_the_last_good_one(small_tmpfs):
    run = small_tmpfs / "run"
    small = torch.nn.Linear(8, 8)
    kwargs = {"state": {}, "arrays": {"plan": np.zeros((4, 2))}, "rng_state": {}, "keep": 2}
    good = save_checkpoint(run, 1, model=small, optimizer_state={}, **kwargs)
    big = torch.nn.Linear(256, 256)  # 257 KiB of weights: more than the tmpfs holds
    opt = torch.optim.AdamW(big.parameters())
    big(torch.ones(1, 256)).sum().backward()
    opt.step()
    with pytest.raises(DDKError) as caught:
        save_checkpoint(run, 2, model=big, optimizer_state=opt.state_dict(), **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "disk full" in message
    need = checkpoint_bytes(big, opt.state_dict(), kwargs["arrays"])
    assert need > 3 * 257 * 256 * 4  # weights + two Adam moments
    assert f"needs about {need / 2**20:.1f} MiB" in message
    assert verify_checkpoint(good) is None
    assert [p.name for p in (run / "checkpoints").iterdir()] == [good.name]


@pytest.mark.slow
def test_distill_on_a_full_disk_stops_in_one_line_and_resumes_once_freed(
    small_tmpfs, world, capsys
):
    """A real run whose second checkpoint does not fit: exit 2, the first one intact, and
    after the disk grows the run resumes from it to the end."""
    subprocess.run(["mount", "-o", "remount,size=900k", str(small_tmpfs)], check=True)
    run = small_tmpfs / "run"  # one checkpoint of the tiny student is about 570 KiB
    cfg = world_config(small_tmpfs.parent / "full.yaml", world, run)
    capsys.readouterr()
    assert main(["distill", cfg]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "disk full while writing checkpoint step 6" in err and "needs about" in err
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert verify_checkpoint(list_checkpoints(run)[0][1]) is None
    assert not list((run / "checkpoints").glob(".tmp-*"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    assert main(["distill", "--resume", str(run)]) == 0
    assert (run / "final" / "model.safetensors").exists()


@pytest.fixture
def tmpfs_1m(tmp_path, mount_tmpfs):
    return mount_tmpfs(tmp_path / "tmpfs", "size=1m")


def test_disk_full_while_saving_the_final_student_is_one_line(tmpfs_1m, tokenizer_dir):
    # Before: a traceback (SafetensorError, exit 1) and a `final/` holding only config.json.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.demo.build import tiny_causal_lm
    from ddk.final import save_final

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    run = tmpfs_1m / "run"
    run.mkdir()
    small = tiny_causal_lm(len(tokenizer), hidden_size=16, num_layers=1)  # ~50 KiB
    save_final(run, small, tokenizer)
    before = tree_digest(run / "final")
    big = tiny_causal_lm(len(tokenizer), hidden_size=128, num_layers=4)  # > 1 MiB of weights
    with pytest.raises(DDKError, match="disk full while saving the final student") as caught:
        save_final(run, big, tokenizer)
    assert "ddk distill --resume" in str(caught.value) and "\n" not in str(caught.value)
    assert tree_digest(run / "final") == before  # the previous final is whole and untouched
    assert sorted(p.name for p in run.iterdir()) == ["final"]  # no half-written folder left
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs_1m)], check=True)
    save_final(run, big, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(run / "final")
    assert loaded.config.hidden_size == 128
    assert sorted(p.name for p in run.iterdir()) == ["final"]
