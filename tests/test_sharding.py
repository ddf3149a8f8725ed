"""DDP, FSDP2 and DeepSpeed ZeRO-2/3 through Accelerate on CPU (gloo, 2 real processes, tiny real
models): the same run as one process, sharded checkpoints that resume exactly (and fall back
past a corrupt one), and a sharded teacher that scores like a replicated one. Plus the
placement choice and the start-up refusals."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddk.errors import DDKError
from ddk.metrics import read_metrics
from ddk.runtime import check_backend
from ddk.teacher.placement import choose_placement
from tests.conftest import run_config, write_config

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
GIB = 2**30

FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
}


def _zero_env(stage):
    # What `accelerate launch --config_file examples/accelerate/zero3.yaml` exports.
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}


try:
    import deepspeed  # noqa: F401

    HAS_DEEPSPEED = True
except ImportError:
    HAS_DEEPSPEED = False
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed not installed (pip install 'ddk-distill[deepspeed]')"
)


# ---------------------------------------------------------------- placement choice (pure)
def test_auto_placement_is_replicated_on_cpu():
    placement, why = choose_placement("auto", teacher_bytes=10 * GIB, free_bytes=None, world_size=2)
    assert placement == "replicated" and "CPU" in why


def test_auto_placement_shards_a_teacher_that_does_not_fit():
    fits = choose_placement("auto", teacher_bytes=28 * GIB, free_bytes=79 * GIB, world_size=8)
    too_big = choose_placement("auto", teacher_bytes=140 * GIB, free_bytes=79 * GIB, world_size=8)
    assert fits[0] == "replicated"
    assert too_big[0] == "sharded" and "8 processes" in too_big[1]
    # One process cannot shard: it stays replicated and says why.
    alone = choose_placement("auto", teacher_bytes=140 * GIB, free_bytes=79 * GIB, world_size=1)
    assert alone[0] == "replicated" and "cannot be sharded" in alone[1]


@pytest.mark.parametrize(
    "requested,world,needle",
    [
        ("sharded", 1, "2+ processes"),
        ("cpu_offload", 1, "2+ processes"),
    ],
)
def test_unsupported_placements_stop_with_one_line(requested, world, needle):
    with pytest.raises(DDKError) as err:
        choose_placement(requested, teacher_bytes=GIB, free_bytes=None, world_size=world)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kind,fsdp2,needle",
    [("FSDP", False, "fsdp_version: 2"), ("XLA", False, "ZeRO-2/3")],
)
def test_unsupported_backends_stop_with_one_line(kind, fsdp2, needle):
    with pytest.raises(DDKError) as err:
        check_backend(kind, fsdp2)
    assert needle in str(err.value) and "\n" not in str(err.value)
    check_backend("FSDP", True)  # FSDP2 passes
    check_backend("DEEPSPEED", False, {"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"zero_optimization": {"stage": 1}}, "zero_stage: 2 or 3"),
        ({}, "ZeRO stage 0"),
        ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "'optimizer'"),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "bf16"),
        (
            {"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": False}},
            "check_grad_overflow",
        ),
    ],
)
def test_unsupported_deepspeed_configs_stop_with_one_line(config, needle):
    with pytest.raises(DDKError) as err:
        check_backend("DEEPSPEED", False, config)
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- real 2-process runs
SHARDED_RUN = {
    "distill.K": 4,
    "trainer.max_steps": 8,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 2,
    "trainer.save_every": 4,
    "trainer.eval_batch_size": 4,
}


def _config(path, root, teacher, student, data, micro, accum, placement="auto"):
    values = run_config(
        root,
        teacher,
        student,
        data,
        SHARDED_RUN,
        **{
            "trainer.micro_batch_size": micro,
            "trainer.grad_accum_steps": accum,
            "teacher.placement": placement,
        },
    )
    return Path(write_config(path, values))


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **extra}


def _torchrun(args, env, processes=2, program=("-m", "ddk.cli")):
    """`ddk` (or a script wrapping it) on `processes` real processes; must exit 0."""
    # --standalone: a rendezvous on a free port, so back-to-back launches never collide
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)]
    done = subprocess.run(
        [*launcher, *program, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _assert_same_run(a_dir, b_dir, rel=1e-5):
    a = read_metrics(a_dir / "metrics.jsonl")
    b = read_metrics(b_dir / "metrics.jsonl")
    assert [r.get("event") for r in a] == [r.get("event") for r in b]
    assert any("loss" in r for r in a)
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=rel)
        for d in ra.get("domains", {}):
            for key in ("weight", "student_ppl", "teacher_ppl"):
                assert rb["domains"][d][key] == pytest.approx(ra["domains"][d][key], rel=rel)
    wa = load_file(a_dir / "final" / "model.safetensors")
    wb = load_file(b_dir / "final" / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    """One uninterrupted 2-process FSDP2 run (8 steps, sharded checkpoints at 4 and 8)."""
    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not installed")
    root = tmp_path_factory.mktemp("fsdp")
    cfg = _config(root / "two.yaml", root / "two", teacher_dir, student_dir, prepared_dir, 2, 2)
    done = _torchrun(["distill", str(cfg)], _env(**FSDP_ENV))
    return root / "two", done.stdout


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    """The reference: the same global batch (4 x 2 sequences) in one plain process."""
    root = tmp_path_factory.mktemp("one")
    one = _config(root / "one.yaml", root / "one", teacher_dir, student_dir, prepared_dir, 4, 2)
    subprocess.run(
        [sys.executable, "-m", "ddk.cli", "distill", str(one)],
        check=True,
        env=_env(),
        capture_output=True,
    )
    return root / "one"


@pytest.mark.slow
@needs_torchrun
def test_ddp_two_processes_match_one(
    tmp_path, one_process_run, teacher_dir, student_dir, prepared_dir
):
    """torch.distributed with gloo through Accelerate's DDP: each rank takes its slice of
    every step; the run equals the one-process run with the same global batch."""
    cfg = _config(
        tmp_path / "two.yaml", tmp_path / "two", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    _torchrun(["distill", str(cfg)], _env())
    _assert_same_run(one_process_run, tmp_path / "two")


@pytest.mark.slow
@needs_torchrun
def test_fsdp2_two_processes_match_one(fsdp_run, one_process_run):
    run, _ = fsdp_run
    # Same domain weights every interval, same losses, same final weights.
    _assert_same_run(one_process_run, run)
    # The checkpoint holds one shard per process (DCP), each under the checksum manifest;
    # final/ is a plain save_pretrained folder.
    ckpt = run / "checkpoints" / "step-00000004"
    shards = sorted(p.name for p in (ckpt / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()
    sums = (ckpt / "checksums.json").read_text()
    assert "sharded/__1_0.distcp" in sums and "sharded/.metadata" in sums
    assert (run / "final" / "config.json").is_file()


@pytest.mark.slow
@needs_torchrun
def test_fsdp2_resume_after_a_kill_is_exact(tmp_path, fsdp_run):
    """A run killed after its step-4 checkpoint (its step-8 checkpoint left corrupt, as a kill
    mid-write could) resumes with 2 processes from step 4 and ends exactly like the
    uninterrupted run."""
    run, _ = fsdp_run
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    shutil.rmtree(killed / "final")
    saved = json.loads(
        (killed / "checkpoints" / "step-00000004" / "trainer_state.json").read_text()
    )
    assert saved["config"]["distill"] and saved["data_fingerprint"]  # what --resume checks
    shard = killed / "checkpoints" / "step-00000008" / "sharded" / "__1_0.distcp"
    shard.write_bytes(b"\0" * 64 + shard.read_bytes()[64:])
    # The saved config points at the original folder; resume keeps the one it is given.
    cfg = yaml.safe_load((killed / "config.yaml").read_text())
    cfg["trainer"]["output_dir"] = str(killed)
    (killed / "config.yaml").write_text(yaml.safe_dump(cfg))
    done = _torchrun(["distill", "--resume", str(killed)], _env(**FSDP_ENV))
    out = done.stdout + done.stderr
    assert "step-00000008' is unusable" in out
    assert "resuming from" in out and "step-00000004" in out
    # Warned once (rank 0 checks, the verdict is broadcast), not once per process.
    assert out.count("is unusable") == 1
    _assert_same_run(run, killed, rel=1e-6)


def _killed_copy(run, dest, drop_after):
    """`run` as a kill after its step-`drop_after` checkpoint would have left it."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    for folder in (dest / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) > drop_after:
            shutil.rmtree(folder)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["trainer"]["output_dir"] = str(dest)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


@pytest.mark.slow
@needs_torchrun
def test_fsdp2_resume_on_another_process_count(tmp_path, fsdp_run):
    """DCP reshards the 2-process FSDP2 states onto 1 process; the same global batch split
    into 4 micro-batches of 2 continues the same run (up to float summation order)."""
    run, _ = fsdp_run
    killed = _killed_copy(run, tmp_path / "killed", drop_after=4)
    split = ["--set", "trainer.micro_batch_size=2", "--set", "trainer.grad_accum_steps=4"]
    done = _torchrun(["distill", "--resume", str(killed), *split], _env(**FSDP_ENV), 1)
    assert "step-00000004" in done.stdout + done.stderr
    _assert_same_run(run, killed, rel=1e-5)
    saved = json.loads(
        (killed / "checkpoints" / "step-00000008" / "trainer_state.json").read_text()
    )
    assert saved["trainer"]["geometry"]["processes"] == 1  # what the next resume checks


@pytest.mark.slow
@needs_torchrun
def test_sharded_teacher_scores_like_replicated_and_ram_efficient_loading_is_exact(
    tmp_path, fsdp_run, teacher_dir, student_dir, prepared_dir
):
    run, replicated_out = fsdp_run
    cfg = _config(
        tmp_path / "sharded.yaml",
        tmp_path / "sharded",
        teacher_dir,
        student_dir,
        prepared_dir,
        2,
        2,
        placement="sharded",
    )
    # Also Accelerate's meta-device loading of the student (which must re-tie its embeddings:
    # untied, the losses drift from the first step).
    env = _env(**FSDP_ENV, FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    done = _torchrun(["distill", str(cfg)], env)
    # Each rank holds about half the teacher (the whole LM head/embedding is kept on both).
    held, total = map(
        int, re.search(r"sharded .* holds (\d+) of (\d+) parameter bytes", done.stdout).groups()
    )
    rep_held = int(re.search(r"replicated .* holds (\d+) of", replicated_out).group(1))
    assert rep_held == total and held < 0.8 * total
    # Same teacher perplexities, domain weights, losses and final student.
    _assert_same_run(run, tmp_path / "sharded")


@pytest.mark.slow
@needs_torchrun
def test_untied_cpu_offload_teacher_read_by_rank0_scores_like_a_whole_one(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    """Sharded placements read the weights on rank 0 only (the others build a meta-device
    skeleton and receive their shards by broadcast). An untied Qwen2 teacher (a separate
    head, kept whole; the embedding sharded), offloaded: its perplexities equal `ddk eval`'s
    on the whole model in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.demo.build import tiny_causal_lm

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = tiny_causal_lm(len(tok), arch="qwen2", hidden_size=48, seed=5)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5)
    untied = tmp_path / "untied"
    model.save_pretrained(untied)
    tok.save_pretrained(untied)
    reloaded = AutoModelForCausalLM.from_pretrained(untied)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.get_input_embeddings().weight.data_ptr()

    cfg_path = _config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        untied,
        student_dir,
        prepared_dir,
        2,
        2,
        placement="cpu_offload",
    )
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["max_steps"] = 2
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = _torchrun(["distill", str(cfg_path)], _env(**FSDP_ENV))
    assert re.search(r"teacher placement: cpu_offload .* weights read by rank 0 only", done.stdout)
    sharded = json.loads((tmp_path / "run" / "teacher_ppl.json").read_text())["ppl"]["val"]
    whole = subprocess.run(
        [sys.executable, "-m", "ddk.cli", "eval", "--model", str(untied)]
        + ["--data", str(prepared_dir), "--split", "val", "--json"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    expected = json.loads(whole.stdout)["domains"]
    assert sorted(sharded) == sorted(expected)
    for d in expected:
        assert sharded[d] == pytest.approx(expected[d]["ppl"], rel=1e-5)


# ---------------------------------------------------------------- DeepSpeed ZeRO-2/3
@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    """A 2-process ZeRO-3 run with a sharded teacher (8 steps, checkpoints at 4 and 8)."""
    if not (os.path.exists(TORCHRUN) and HAS_DEEPSPEED):
        pytest.skip("torchrun or deepspeed not installed")
    root = tmp_path_factory.mktemp("zero3")
    cfg = _config(
        root / "z3.yaml",
        root / "z3",
        teacher_dir,
        student_dir,
        prepared_dir,
        2,
        2,
        placement="sharded",
    )
    done = _torchrun(["distill", str(cfg)], _env(**_zero_env(3)))
    return root / "z3", done.stdout + done.stderr


@pytest.mark.slow
@needs_torchrun
@needs_deepspeed
def test_zero3_two_processes_match_one(zero3_run, one_process_run):
    """ZeRO-3 partitions the student (the fused loss gathers the LM head as an external
    parameter); ddk keeps its own accumulation, clipping bound and schedule: the run equals the
    plain one-process run, teacher perplexities (sharded teacher) included."""
    run, out = zero3_run
    assert "teacher placement: sharded" in out
    _assert_same_run(one_process_run, run)
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "deepspeed" / "state").is_dir() and not (ckpt / "model.safetensors").exists()
    sums = json.loads((ckpt / "checksums.json").read_text())
    optim = [f for f in sums if "optim_states" in f]
    assert len(optim) == 2  # one partition of the fp32 master weights and moments per rank
    # final/ is a plain save_pretrained folder with fp32 weights.
    weights = load_file(run / "final" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.slow
@needs_torchrun
@needs_deepspeed
def test_zero3_resume_after_a_kill_is_exact(tmp_path, zero3_run):
    run, _ = zero3_run
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    shutil.rmtree(killed / "final")
    states = killed / "checkpoints" / "step-00000008" / "deepspeed" / "state"
    victim = sorted(states.glob("*optim_states.pt"))[-1]
    victim.write_bytes(b"\0" * 64 + victim.read_bytes()[64:])
    cfg = yaml.safe_load((killed / "config.yaml").read_text())
    cfg["trainer"]["output_dir"] = str(killed)
    (killed / "config.yaml").write_text(yaml.safe_dump(cfg))
    done = _torchrun(["distill", "--resume", str(killed)], _env(**_zero_env(3)))
    out = done.stdout + done.stderr
    assert "step-00000008' is unusable" in out and out.count("is unusable") == 1
    assert out.count("resuming from") == 1 and "step-00000004" in out
    _assert_same_run(run, killed, rel=1e-6)
    # A DeepSpeed checkpoint is not resumed under another backend: one line, nothing written.
    before = sorted(p.name for p in (killed / "checkpoints").iterdir())
    other = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "ddk.cli"]
        + ["distill", "--resume", str(killed), "--set", "trainer.max_steps=12"],
        env=_env(**FSDP_ENV),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode != 0  # torchrun reports its workers' exit 2 as 1
    assert "holds DeepSpeed states but this launch uses fsdp2" in other.stderr
    assert "[rank0]: Traceback" not in other.stderr  # one line, not a worker traceback
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == before
    # ZeRO partitions are not resharded: another process count is refused in one line.
    split = ["--set", "trainer.micro_batch_size=2", "--set", "trainer.grad_accum_steps=4"]
    one = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "1", "-m", "ddk.cli"]
        + ["distill", "--resume", str(killed), *split, "--set", "teacher.placement=replicated"],
        env=_env(**_zero_env(3)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode != 0
    assert "ZeRO partitions of 2 processes; resume with 2 processes" in one.stderr
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == before


@pytest.mark.slow
@needs_torchrun
@needs_deepspeed
def test_zero2_two_processes_match_one(
    tmp_path, one_process_run, teacher_dir, student_dir, prepared_dir
):
    cfg = _config(
        tmp_path / "z2.yaml", tmp_path / "z2", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    _torchrun(["distill", str(cfg)], _env(**_zero_env(2)))
    _assert_same_run(one_process_run, tmp_path / "z2")


NAN_SCRIPT = """
import os
import sys
import torch
from ddk import cli
from ddk.runtime import Runtime
from ddk.step import DistillStep

original = DistillStep.forward
calls = {"n": 0}


def forward(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls["n"] += 1  # two micro-batches per step: calls 2s-1 and 2s belong to step s
    if torch.distributed.get_rank() == 0 and calls["n"] == 2 * 3:
        # A NaN loss whose gradients are finite (the NaN term is a constant).
        out = out._replace(total=out.total + float("nan") * out.total.detach())
    if torch.distributed.get_rank() == 0 and calls["n"] == 2 * 6:
        out = out._replace(total=out.total * float("nan"))  # NaN gradients too
    return out


def local_weights(module):
    # ZeRO-3 holds each rank's partition in ds_tensor (the parameter itself is empty).
    return [getattr(p, "ds_tensor", p).detach().clone() for p in module.parameters()]


def optimizer_step(self, module, optimizer, max_norm, loss_finite):
    before = local_weights(module)
    grad_norm, applied = original_step(self, module, optimizer, max_norm, loss_finite)
    if not applied and self.rank == 0:  # a skipped step must leave every weight as it was
        same = all(torch.equal(a, p) for a, p in zip(before, local_weights(module)))
        with open(os.environ["SKIPPED_STEPS_FILE"], "a") as f:
            f.write(f"unchanged={same}\\n")
    return grad_norm, applied


if os.environ.get("DISABLE_DEEPSPEED_OVERFLOW_CHECK"):
    # What ZeRO-3 before 0.19.8 did in bf16/fp32: no overflow check and a NaN norm taken for
    # a valid one, so ddk's own check must skip.
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    for module in (stage3, stage_1_and_2):
        module.is_invalid_grad_norm = lambda norm: False
    for cls in (stage_1_and_2.DeepSpeedZeroOptimizer, stage3.DeepSpeedZeroOptimizer_Stage3):
        cls.has_overflow = lambda self, *args, **kwargs: False

original_step = Runtime.optimizer_step
Runtime.optimizer_step = optimizer_step
DistillStep.forward = forward
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_torchrun
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_skips_nan_steps_without_deepspeeds_overflow_check(
    tmp_path, teacher_dir, student_dir, prepared_dir, stage
):
    """ddk's NaN/inf step skip holds under DeepSpeed ZeRO-2 and ZeRO-3 on its own: a NaN loss
    with finite gradients (which ZeRO alone would apply) and NaN gradients, with DeepSpeed's
    overflow check switched off (ZeRO-3 before 0.19.8 has none outside fp16)."""
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_SCRIPT)
    cfg = _config(
        tmp_path / "nan.yaml", tmp_path / "nan", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    env = _env(
        **_zero_env(stage),
        SKIPPED_STEPS_FILE=str(tmp_path / "skipped.txt"),
        DISABLE_DEEPSPEED_OVERFLOW_CHECK="1",
    )
    _torchrun(["distill", str(cfg)], env, program=[str(script)])
    assert (tmp_path / "skipped.txt").read_text() == "unchanged=True\n" * 2
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "skipped_step"] == [3, 6]
    steps = [r for r in records if "event" not in r]
    assert steps[-1]["bad_steps"] == 2
    # Logged every 2 steps: step 6's own loss is NaN; training went on finite after it.
    assert [r["step"] for r in steps if r["loss"] != r["loss"]] == [6]
    weights = load_file(tmp_path / "nan" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
@needs_torchrun
@needs_deepspeed
def test_zero3_cpt_loads_its_teacher_for_the_report(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    """cpt trains without a teacher and loads one after the ZeRO-3 engine has partitioned the
    student: the vocabulary check must read the head's full row count, not its empty shard."""
    cfg_path = _config(
        tmp_path / "c.yaml", tmp_path / "run", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["distill"]["method"] = "cpt"
    cfg["trainer"]["max_steps"] = 2
    cfg_path.write_text(yaml.safe_dump(cfg))
    _torchrun(["distill", str(cfg_path)], _env(**_zero_env(3)))
    ppl = json.loads((tmp_path / "run" / "teacher_ppl.json").read_text())["ppl"]
    assert set(ppl) == {"val", "test"} and all(v > 1 for v in ppl["test"].values())


OPTIMIZER_SCRIPT = """
import sys
from ddk import cli
from ddk.runtime import Runtime

original = Runtime.prepare_training


def prepare_training(self, module, optimizer, **kwargs):
    module, optimizer = original(self, module, optimizer, **kwargs)
    if self.is_main:  # Accelerate swaps AdamW for DeepSpeedCPUAdam under optimizer offload
        print("stepping optimizer:", type(optimizer.optimizer.optimizer).__name__)
    return module, optimizer


Runtime.prepare_training = prepare_training
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_torchrun
@needs_deepspeed
def test_zero2_optimizer_offload_resumes_exactly(tmp_path, teacher_dir, student_dir, prepared_dir):
    """Under optimizer offload the optimizer that steps is DeepSpeedCPUAdam, whose
    load_state_dict installs new parameter groups on resume: the learning-rate schedule must
    keep driving those (it froze when it drove the original AdamW's groups)."""
    script = tmp_path / "run.py"
    script.write_text(OPTIMIZER_SCRIPT)
    env = _env(**_zero_env(2), ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu")
    cfg = _config(
        tmp_path / "c.yaml", tmp_path / "whole", teacher_dir, student_dir, prepared_dir, 2, 2
    )

    done = _torchrun(["distill", str(cfg)], env, program=[str(script)])
    assert "stepping optimizer: DeepSpeedCPUAdam" in done.stdout
    killed = _killed_copy(tmp_path / "whole", tmp_path / "killed", drop_after=4)
    _torchrun(["distill", "--resume", str(killed)], env, program=[str(script)])
    _assert_same_run(tmp_path / "whole", killed, rel=1e-6)


ONE_RANK_FAILS = """
import sys
import torch.distributed as dist
from ddk import cli
from ddk.errors import DDKError
from ddk.trainer import Trainer

original = Trainer.train_step


def train_step(self, *args, **kwargs):
    if dist.get_rank() == 1 and self.state.step == 2:
        raise DDKError("rank one cannot go on")  # rank 0 is left in a collective
    return original(self, *args, **kwargs)


Trainer.train_step = train_step
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@needs_torchrun
def test_surviving_rank_exits_quietly_after_another_ranks_one_line(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    script = tmp_path / "fail.py"
    script.write_text(ONE_RANK_FAILS)
    cfg = _config(
        tmp_path / "c.yaml", tmp_path / "run", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    done = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), "distill", str(cfg)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "rank one cannot go on" in done.stderr
    # torchrun's own launcher traceback names the failed worker; no worker prints one.
    assert "[rank0]: Traceback" not in done.stderr, done.stderr[-3000:]
    assert "[rank1]: Traceback" not in done.stderr, done.stderr[-3000:]
