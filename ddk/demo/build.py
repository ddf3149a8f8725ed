"""Building a BPE tokenizer and small causal LMs from scratch, saved with `save_pretrained`.

Used by `ddk demo` and by the tests: both then load them back through the same
`from_pretrained` path a user's hub models take.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

EOS = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, split_digits: bool = False
) -> Path:
    """Byte-level BPE (GPT-2 style) trained on `texts`, saved as a transformers fast tokenizer.
    `split_digits`: every digit its own pre-token (LLaMA style), so the tokenizer cuts text
    differently from one without it, beyond the vocabulary size (a cross-tokenizer teacher)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def tiny_causal_lm(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    arch: str = "llama",
    seed: int = 0,
    padded_vocab: int | None = None,
):
    """A randomly initialised Llama or Qwen2 model; `padded_vocab` pads the embedding matrix
    past the tokenizer, as Qwen checkpoints do."""
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(
        vocab_size=padded_vocab or vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
