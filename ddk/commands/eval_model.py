"""`ddk eval`: per-domain test (or validation) perplexity of any model on prepared data."""

from __future__ import annotations

import json
import math

import torch

from ddk.data.dataset import PreparedData
from ddk.data.vocab import same_vocabulary
from ddk.errors import DDKError
from ddk.evaluate import domain_perplexities, report_split
from ddk.models import check_vocab, embedding_rows, load_model, load_tokenizer, resolve_dtype
from ddk.runtime import LocalRuntime
from ddk.table import format_table


def evaluate_model_cli(
    model_name: str,
    data_dir: str,
    *,
    domains: list[str] | None,
    batch_size: int,
    max_sequences: int | None,
    as_json: bool,
    split: str = "test",
) -> dict:
    if domains is not None and not domains:
        raise DDKError("--domains needs at least one domain name")
    data = PreparedData(data_dir, domains)
    try:
        tokenizer = load_tokenizer(model_name)
    except DDKError:
        tokenizer = None  # a model folder without tokenizer files: rely on the size check
    if tokenizer is not None and not same_vocabulary(data.manifest, tokenizer):
        raise DDKError(
            f"'{data_dir}' was tokenised with '{data.manifest.tokenizer.name_or_path}', whose "
            f"vocabulary differs from the tokenizer of '{model_name}'; prepare it with the model's"
        )
    runtime = LocalRuntime("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_name, dtype=resolve_dtype("auto", runtime.device), what="model")
    model = model.to(runtime.device)
    check_vocab(data.vocab_size, None, embedding_rows(model))
    split = report_split(data, split)
    result = domain_perplexities(
        model,
        data,
        vocab_size=data.vocab_size,
        split=split,
        batch_size=batch_size,
        max_sequences=max_sequences,
        runtime=runtime,
    )
    if as_json:
        payload = {"model": model_name, "data": str(data_dir), "split": split, "domains": result}
        print(json.dumps(payload, indent=2))
    else:
        print(f"{split} split perplexity per domain")
        print(_table(result))
    return result


def _table(result: dict) -> str:
    rows = [[name, r["ppl"], r["loss"], r["tokens"]] for name, r in result.items()]
    ppls = [r["ppl"] for r in result.values()]
    geo = math.exp(sum(math.log(p) for p in ppls) / len(ppls))
    rows.append(["geometric mean", geo, math.log(geo), sum(r["tokens"] for r in result.values())])
    return format_table(["domain", "perplexity", "loss (nats)", "tokens"], rows)
