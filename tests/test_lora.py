"""LoRA students (`model.lora`, through peft) on the real tiny Llama student saved with
save_pretrained: the merge against peft's own, final/ equal to base + adapter, only the
adapters trained and checkpointed, an exact resume after SIGKILL, FSDP2 on 2 processes equal
to 1 process, and the one-line refusals."""

import importlib.util
import json
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ddk.checkpoint import list_checkpoints
from ddk.cli import main
from ddk.config import LoraSection
from ddk.demo.build import tiny_causal_lm
from ddk.errors import DDKError
from ddk.lora import ALL_LINEAR, check_backend, merged_state_dict, target_problems
from ddk.run_dir import protected_differences, start_run
from ddk.runtime import Runtime
from tests.conftest import make_config, one_error_line, run_config, write_config
from tests.test_resume import ddk_process
from tests.test_sharding import (
    FSDP_ENV,
    _assert_same_run,
    _env,
    _killed_copy,
    _torchrun,
    needs_torchrun,
)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora_memory.py"
peft = pytest.importorskip("peft", reason="pip install 'ddk-distill[peft]'")

# Adapters on three of the seven linear layer kinds: the other four must not move.
TARGETS = ["q_proj", "v_proj", "gate_proj"]
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": TARGETS}
LORA_RUN = {
    "distill.K": 4,
    "trainer.max_steps": 8,
    "trainer.lr": 3e-2,  # adapters start at B = 0: a high rate so 8 steps move them
    "trainer.min_lr": 3e-3,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 2,
    "trainer.save_every": 4,
    "trainer.eval_batch_size": 4,
    "model.lora": LORA,
}


def _lora_config(path: Path, run: Path, teacher, student, data, micro=4, accum=2) -> str:
    extra = {"trainer.micro_batch_size": micro, "trainer.grad_accum_steps": accum}
    return write_config(path, run_config(run, teacher, student, data, LORA_RUN, **extra))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- pure: the merge, the checks
def test_merged_state_dict_equals_peft_merge_and_unload():
    base = tiny_causal_lm(50, hidden_size=16, num_heads=2, seed=3)
    lora = LoraSection(r=2, alpha=6.0, target_modules=ALL_LINEAR)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=2, lora_alpha=6.0, target_modules="all-linear"),
    )
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            torch.nn.init.normal_(p, std=0.1)
    live = model.base_model.model.state_dict()
    ours = merged_state_dict({k: v.clone() for k, v in live.items()}, lora)
    theirs = model.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6)


def test_target_modules_the_student_lacks_are_listed_with_the_candidates():
    model = tiny_causal_lm(50, hidden_size=16, num_heads=2)
    ok = LoraSection(target_modules=["q_proj", "self_attn.v_proj", "mlp.down_proj"])
    assert target_problems(ok, model) == []
    assert target_problems(LoraSection(), model) == []  # all-linear
    (problem,) = target_problems(LoraSection(target_modules=["q_proj", "c_attn"]), model)
    assert "c_attn not among" in problem and "q_proj," not in problem.split(";")[0]
    assert problem.endswith(
        "candidates: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    # The LM head: ddk's fused loss reads its weight directly, an adapter there would be inert.
    (head,) = target_problems(LoraSection(target_modules=["lm_head"]), model)
    assert "lm_head not among" in head


def test_a_student_without_linear_layers_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    (problem,) = target_problems(LoraSection(), gpt2)  # its Conv1D cannot be merged as Linear
    assert "no torch.nn.Linear layers" in problem and "Conv1D" in problem


def test_deepspeed_with_lora_is_refused_in_one_line():
    with pytest.raises(DDKError) as err:
        check_backend("deepspeed")
    assert "DDP or FSDP2" in str(err.value) and "\n" not in str(err.value)
    check_backend("ddp")
    check_backend("fsdp2")


def test_deepspeed_with_lora_stops_the_run_before_anything_is_written(
    tmp_path, teacher_dir, student_dir, prepared_dir
):
    runtime = Runtime(cpu=True)
    runtime.backend = "deepspeed"  # what a ZeRO launch sets; refused before any step or file
    cfg = make_config(tmp_path / "run", teacher_dir, student_dir, prepared_dir, LORA_RUN)
    with pytest.raises(DDKError, match="not supported under DeepSpeed ZeRO"):
        start_run(cfg, runtime=runtime)
    assert not (tmp_path / "run").exists()


def test_zero3_with_lora_is_refused_not_crashed(tmp_path, teacher_dir, student_dir, prepared_dir):
    """Under a ZeRO-3 launch transformers partitions every model it builds from a config; the
    preflight's meta-device skeleton must not be one of them."""
    pytest.importorskip("deepspeed", reason="pip install 'ddk-distill[deepspeed]'")
    runtime = Runtime(cpu=True)
    runtime.backend = "deepspeed"
    # What Accelerate's ZeRO-3 plugin keeps alive for transformers while a launch runs.
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    assert is_deepspeed_zero3_enabled()
    cfg = make_config(tmp_path / "run", teacher_dir, student_dir, prepared_dir, LORA_RUN)
    try:
        with pytest.raises(DDKError, match="not supported under DeepSpeed ZeRO"):
            start_run(cfg, runtime=runtime)
    finally:
        del zero3
        unset_hf_deepspeed_config()
    assert not (tmp_path / "run").exists()


def test_bad_target_modules_stop_before_training_with_nothing_written(
    tmp_path, capsys, teacher_dir, student_dir, prepared_dir
):
    run = tmp_path / "run"
    values = run_config(run, teacher_dir, student_dir, prepared_dir, LORA_RUN)
    values["model.lora"] = {**LORA, "target_modules": ["q_proj", "query_key_value"]}
    code = main(["distill", write_config(tmp_path / "c.yaml", values)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.lora.target_modules: query_key_value not among" in line
    assert "candidates: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in line
    assert not run.exists()


def test_a_changed_lora_section_is_refused_on_resume():
    a = {"model": {"lora": LORA}, "trainer": {"lr": 1e-3}}
    b = {"model": {"lora": {**LORA, "r": 8}}, "trainer": {"lr": 1e-3}}
    assert protected_differences(a, b) == ["model.lora"]
    assert protected_differences(a, {"model": {"lora": None}, "trainer": {"lr": 1e-3}})


def test_the_memory_benchmark_measures_what_the_arithmetic_says():
    """One real step of the benchmark's tiny Llama: gradients and AdamW moments exist for the
    adapters only (4 B + 8 B each), the frozen base keeps its weights (4 B each)."""
    spec = importlib.util.spec_from_file_location("bench_lora_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lora = LoraSection(r=4, alpha=8.0)
    full = bench.measure_one("tiny", "full", lora.model_dump_json())
    ours = bench.measure_one("tiny", "lora", lora.model_dump_json())
    assert ours["params"] == full["params"] == full["trained"] > ours["trained"] > 0
    expected = bench.state_bytes(ours["params"], ours["trained"], lora=True)
    # tied embedding + LM head are one storage, counted once by both
    assert {k: ours[k] for k in expected} == expected
    assert full["grads"] == full["weights"] and full["adamw"] == 2 * full["weights"]


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    """One uninterrupted 1-process LoRA run (8 steps, checkpoints at 4 and 8)."""
    root = tmp_path_factory.mktemp("lora")
    cfg = _lora_config(root / "c.yaml", root / "run", teacher_dir, student_dir, prepared_dir)
    assert main(["distill", cfg]) == 0
    return root / "run"


@pytest.mark.slow
def test_final_is_base_plus_adapter_and_only_adapters_changed(lora_run, student_dir):
    final = lora_run / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    with_adapter = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(student_dir), final / "adapter"
    )
    ids = torch.randint(
        0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(
        _logits(merged, ids), _logits(with_adapter, ids), rtol=1e-4, atol=1e-5
    )
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(TARGETS)

    base = load_file(student_dir / "model.safetensors")
    merged_sd = load_file(final / "model.safetensors")
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert sorted(merged_sd) == sorted(base)
    scaling = LORA["alpha"] / LORA["r"]
    adapted = 0
    for key, weight in base.items():
        layer = key.removesuffix(".weight")
        if any(layer.endswith("." + t) for t in TARGETS):
            a = adapter[f"base_model.model.{layer}.lora_A.weight"]
            b = adapter[f"base_model.model.{layer}.lora_B.weight"]
            assert b.abs().max() > 0, f"{layer}'s adapter never trained"
            # merged - s·B@A is the base weight: the frozen base_layer did not move
            torch.testing.assert_close(merged_sd[key] - scaling * b @ a, weight, rtol=0, atol=1e-6)
            adapted += 1
        else:  # embeddings, norms, k/o/up/down projections: bit-identical to the base
            assert torch.equal(merged_sd[key], weight), key
    assert adapted == 3 * 2  # three kinds x two layers


@pytest.mark.slow
def test_checkpoints_hold_only_the_adapters_and_their_optimizer_state(lora_run):
    ckpt = lora_run / "checkpoints" / "step-00000004"
    weights = load_file(ckpt / "model.safetensors")
    assert len(weights) == 2 * 3 * 2  # A and B, three kinds, two layers
    assert all(".lora_" in k.replace("/", ".") for k in weights)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(weights)
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer["state"][0])


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(
    tmp_path, lora_run, teacher_dir, student_dir, prepared_dir
):
    run = tmp_path / "run"
    proc = ddk_process(
        "distill", _lora_config(tmp_path / "c.yaml", run, teacher_dir, student_dir, prepared_dir)
    )
    deadline = time.time() + 300
    while not list_checkpoints(run):  # the step-4 checkpoint
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "finished before the kill"
    resumed = ddk_process("distill", "--resume", str(run))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (run / "final" / name).read_bytes() == (lora_run / "final" / name).read_bytes(), name


@pytest.fixture(scope="module")
def fsdp_lora_run(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    """The same LoRA run on 2 FSDP2 processes: the same global batch (2 processes x 2
    sequences x 2 micro-batches)."""
    root = tmp_path_factory.mktemp("fsdp_lora")
    cfg = _lora_config(
        root / "two.yaml", root / "two", teacher_dir, student_dir, prepared_dir, 2, 2
    )
    _torchrun(["distill", cfg], _env(**FSDP_ENV))
    return root / "two"


def _assert_same_adapter(a_run: Path, b_run: Path) -> None:
    a = load_file(a_run / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(b_run / "final" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@needs_torchrun
def test_fsdp2_two_processes_match_one(lora_run, fsdp_lora_run):
    """FSDP2 shards the frozen base and the adapters alike; its checkpoints hold the adapters
    (and their AdamW moments) only, the tied LM head included in neither."""
    _assert_same_run(lora_run, fsdp_lora_run)
    _assert_same_adapter(lora_run, fsdp_lora_run)
    sharded = fsdp_lora_run / "checkpoints" / "step-00000004" / "sharded"
    saved = dcp.FileSystemReader(str(sharded)).read_metadata().state_dict_metadata
    weights = {k for k in saved if k.startswith("model.")}
    assert len(weights) == 2 * 3 * 2 and all(".lora_" in k for k in weights), sorted(weights)
    assert all(".lora_" in k for k in saved if k.startswith("optim.state."))


@pytest.mark.slow
@needs_torchrun
def test_ddp_two_processes_match_one(tmp_path, lora_run, teacher_dir, student_dir, prepared_dir):
    """DDP all-reduces the adapters' gradients only (the frozen base has none)."""
    two = tmp_path / "two"
    cfg = _lora_config(tmp_path / "two.yaml", two, teacher_dir, student_dir, prepared_dir, 2, 2)
    _torchrun(["distill", cfg], _env())
    _assert_same_run(lora_run, two)
    _assert_same_adapter(lora_run, two)


@pytest.mark.slow
@needs_torchrun
def test_fsdp2_resume_after_a_kill_is_exact(tmp_path, fsdp_lora_run):
    """Killed after its step-4 checkpoint, the 2-process run resumes from the adapters alone
    (the base re-read from the student's folder) and ends as the uninterrupted one."""
    killed = _killed_copy(fsdp_lora_run, tmp_path / "killed", drop_after=4)
    done = _torchrun(["distill", "--resume", str(killed)], _env(**FSDP_ENV))
    assert "step-00000004" in done.stdout + done.stderr
    _assert_same_run(fsdp_lora_run, killed, rel=1e-6)
    _assert_same_adapter(fsdp_lora_run, killed)
