"""Loading the tokenizer, teacher and student with `from_pretrained`, and the vocabulary check."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import deepspeed as hf_deepspeed

from ddk.errors import DDKError, first_line
from ddk.logits import logit_transform

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _looks_local(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_local_path(name: str, what: str) -> str:
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded
    if _looks_local(name):
        raise DDKError(
            f"{what} path '{name}' does not exist; give a local model folder or a hub id"
        )
    return name


def local_model_folder(name: str, what: str = "model") -> Path | None:
    """A model's folder on this machine: a local path, or a hub id's downloaded snapshot (the
    hub itself is never contacted); None when its files are not here."""
    path = Path(resolve_local_path(name, what))
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A fast tokenizer from a hub id or a local folder."""
    path = resolve_local_path(name, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DDKError(f"cannot load tokenizer '{name}': {first_line(e)}") from None
    if not getattr(tok, "is_fast", False):
        raise DDKError(f"tokenizer '{name}' has no fast (Rust) version; ddk needs a fast tokenizer")
    return tok


# Digits, accents (composed and not), full-width letters, whitespace runs and code: text that
# normalizers and pre-tokenizers treat differently.
_PROBE = "Hello World 12345 + 678 = 13023; cafe\u0301 café ＦＵＬＬ  \t\n  x=[1,2] # ÉCOLE straße"


def tokenizer_file_difference(tok, name: str) -> str | None:
    """How the tokenizer transformers built for `name` splits text differently from the
    folder's own tokenizer.json, or None. transformers 5 builds a model type's tokenizer class
    (Qwen2Tokenizer for a qwen2 config, ...), which replaces the file's normalizer,
    pre-tokenizer and decoder with the class's own (huggingface/transformers#44462): a model
    trained with its tokenizer.json then reads text cut another way, with the same vocabulary."""
    folder = local_model_folder(name, "tokenizer")
    file = folder / "tokenizer.json" if folder is not None else None
    if file is None or not file.is_file():
        return None
    try:
        own = Tokenizer.from_file(str(file)).encode(_PROBE, add_special_tokens=False).ids
    except Exception:  # a file the tokenizers library cannot read: nothing to compare with
        return None
    built = tok(_PROBE, add_special_tokens=False)["input_ids"]
    if list(built) == list(own):
        return None
    at = next((i for i, (a, b) in enumerate(zip(built, own)) if a != b), min(len(built), len(own)))
    return (
        f"transformers loads the tokenizer of '{name}' as {type(tok).__name__}, which splits "
        f"text differently from its tokenizer.json (a probe text: {len(built)} tokens against "
        f"{len(own)}, first different at token {at}); ddk uses what transformers loads, so "
        "check that the model was trained with that tokenisation"
    )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@contextlib.contextmanager
def whole_weights():
    """transformers partitions a model as it loads (`deepspeed.zero.Init`) while an Accelerate
    ZeRO-3 config is active. ddk loads whole weights instead: the logit probe needs a forward,
    the teacher is placed by ddk (teacher.placement), and the student is partitioned by the
    DeepSpeed engine when the runtime prepares it."""
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def load_model(name: str, *, dtype: torch.dtype, what: str, trust_remote_code: bool = False):
    path = resolve_local_path(name, what)
    try:
        with whole_weights():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise DDKError(f"cannot load {what} '{name}': {first_line(e)}") from None
    except (SafetensorError, RuntimeError, EOFError, KeyError) as e:
        # Truncated or corrupt weight files (safetensors header/size errors, torch load errors).
        raise DDKError(
            f"cannot load {what} '{name}': its weight files are truncated or corrupt "
            f"({first_line(e)}); copy or save the model folder again"
        ) from None
    logit_transform(model, name)  # probe now: an unsupported head stops before any work
    return model


def load_teacher(name: str, *, dtype: torch.dtype, trust_remote_code: bool = False):
    """The frozen teacher: eval mode, no gradients."""
    model = load_model(name, dtype=dtype, what="teacher", trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    return model


def embedding_rows(model) -> int:
    weight = model.get_output_embeddings().weight
    # ZeRO-3 leaves a partitioned parameter empty and records its full shape as ds_shape.
    return int(getattr(weight, "ds_shape", weight.shape)[0])


@dataclass(frozen=True)
class VocabCheck:
    """The shared vocabulary: logits of both models are trimmed to `size` columns."""

    size: int
    teacher_rows: int
    student_rows: int


def check_vocab(tokenizer_size: int, teacher_rows: int | None, student_rows: int) -> VocabCheck:
    """Models whose output matrix is padded past the tokenizer (Qwen: 151936 rows for a 151646
    token tokenizer) pass, with logits trimmed to the tokenizer's size; a model with fewer rows
    than the tokenizer has tokens cannot score every token and stops the run."""
    rows = {"student": student_rows}
    if teacher_rows is not None:
        rows["teacher"] = teacher_rows
    for who, n in rows.items():
        if n < tokenizer_size:
            sizes = ", ".join(f"{w} {r}" for w, r in rows.items())
            raise DDKError(
                f"vocabulary mismatch: tokenizer has {tokenizer_size} tokens but the {who}'s output "
                f"layer has {n} rows ({sizes}); teacher and student must share one vocabulary"
            )
    return VocabCheck(tokenizer_size, teacher_rows or 0, student_rows)


def check_tokenizers_match(teacher_tok, student_tok, teacher: str, student: str) -> None:
    """Identical vocabularies (token -> id) pass; anything else is a real mismatch."""
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise DDKError(
            f"vocabulary mismatch: teacher '{teacher}' tokenizer has {len(teacher_tok)} tokens, "
            f"student '{student}' has {len(student_tok)} (or the same size with other ids); "
            "ddk needs teacher and student from one model family with one tokenizer"
        )


def eval_tokenizer(model_name: str):
    """The model's tokenizer, or None for a model folder without tokenizer files."""
    try:
        return load_tokenizer(model_name, trust_remote_code=False)
    except DDKError:
        return None


def eval_model(model_name: str, device: torch.device | str | None = None):
    """A model for evaluation: on `device` (default: the GPU when there is one), in ddk's
    evaluation dtype."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(
        model_name,
        dtype=resolve_dtype("auto", device),
        what="model",
        trust_remote_code=False,  # ddk eval runs no model code
    )
    return model.to(device)
