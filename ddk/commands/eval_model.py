"""`ddk eval`: per-domain test (or validation) perplexity of any model on prepared data
(`--data`; a model with another tokenizer is scored per byte on data with byte spans, as a
cross-tokenizer teacher is), and benchmark scores through lm-evaluation-harness (`--tasks`,
ddk.harness)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ddk.config import EvalSection, load_config
from ddk.data.dataset import PreparedData
from ddk.data.manifest import read_manifest
from ddk.data.vocab import same_vocabulary
from ddk.errors import DDKError
from ddk.evaluate import domain_perplexities, report_split
from ddk.harness import benchmark_model_cli
from ddk.models import check_vocab, embedding_rows, eval_model, eval_tokenizer
from ddk.runtime import LocalRuntime
from ddk.table import format_table
from ddk.teacher.crosstok import CrossTokenizerTeacher


def eval_command(args) -> None:
    """Perplexity (--data) and/or benchmarks (--tasks, or the run's / CONFIG's eval.tasks),
    with one model load for both."""
    model, run = resolve_model_folder(args.model)
    section = eval_section(args, run)
    if not args.data and not section.tasks:
        raise DDKError(
            "nothing to evaluate: give --data (per-domain perplexity) and/or --tasks (benchmarks)"
        )
    if args.json and args.data and section.tasks:
        raise DDKError("--json prints one kind of result: give --data or --tasks (or use --out)")
    loaded = None
    if args.data and section.tasks:  # one load for both
        loaded = (eval_model(model), eval_tokenizer(model))
    if args.data:
        evaluate_model_cli(
            model,
            args.data,
            domains=args.domains,
            batch_size=args.batch_size or 8,
            max_sequences=args.max_sequences,
            as_json=args.json,
            split=args.split,
            loaded=loaded,
        )
    if section.tasks:
        domains = list(read_manifest(Path(args.data)).domains) if args.data else None
        benchmark_model_cli(
            model, section, out=args.out, as_json=args.json, domains=domains, loaded=loaded
        )


def eval_section(args, run: Path | None) -> EvalSection:
    """The `eval` section: CONFIG's, or a run folder's own (unless --data asks for perplexity
    only), then the flags and --set on top."""
    run_config = run / "config.yaml" if run and not args.data else None
    source = args.config or (run_config if run_config and run_config.is_file() else None)
    flags = {
        "tasks": args.tasks,
        "include_path": args.include_path,
        "num_fewshot": args.num_fewshot,
        "limit": int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        "batch_size": args.batch_size,
    }
    overrides = [f"eval.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if args.confirm_run_unsafe_code:
        overrides.append("eval.confirm_run_unsafe_code=true")
    return load_config(source, overrides + args.overrides).eval


def resolve_model_folder(name: str) -> tuple[str, Path | None]:
    """A run folder (written by `ddk distill`) stands for its final model: (RUN/final, RUN);
    anything else is a model folder or hub id: (name, None)."""
    path = Path(name).expanduser()
    is_run = (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()
    if path.is_dir() and not (path / "config.json").exists() and is_run:
        if not (path / "final").is_dir():
            raise DDKError(
                f"run '{name}' has no final model yet (RUN/final); finish it with "
                f"`ddk distill --resume {name}` or give a model folder"
            )
        return str(path / "final"), path
    return name, None


def _local_runtime() -> LocalRuntime:
    return LocalRuntime("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_model_cli(
    model_name: str,
    data_dir: str,
    *,
    domains: list[str] | None,
    batch_size: int,
    max_sequences: int | None,
    as_json: bool,
    split: str = "test",
    loaded: tuple | None = None,
) -> dict:
    """`ddk eval --data`: per-domain perplexity, printed as a table or JSON. `loaded`: the
    (model, tokenizer) when the caller has them already (else read after the cheap checks)."""
    if domains is not None and not domains:
        raise DDKError("--domains needs at least one domain name")
    data = PreparedData(data_dir, domains)
    model, tokenizer = loaded or (None, eval_tokenizer(model_name))
    cross = tokenizer is not None and not same_vocabulary(data.manifest, tokenizer)
    if cross:
        _check_cross_eval(data, model_name, max_sequences)
    runtime = _local_runtime()
    if model is None:
        model = eval_model(model_name, runtime.device)
    split = report_split(data, split)
    if cross:
        teacher = CrossTokenizerTeacher(model, tokenizer, tokenizer, data)
        result = {d: teacher.domain_nll(split, d, batch_size) for d in data.names}
    else:
        check_vocab(data.vocab_size, None, embedding_rows(model))
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
        if data.targets:
            payload["targets"] = data.targets
        print(json.dumps(payload, indent=2))
    else:
        counted = f", counting only the targets of the {data.targets}" if data.targets else ""
        print(f"{split} split perplexity per domain{counted}")
        print(_table(result))
    return result


def _check_cross_eval(data, model_name: str, max_sequences: int | None) -> None:
    """A model with another tokenizer is scored per byte on the data's own text: that needs
    byte spans (which chat data never has: prepare refuses them) and every window."""
    if not (data.manifest.model_extra or {}).get("byte_spans"):
        raise DDKError(
            f"'{data.folder}' was tokenised with '{data.manifest.tokenizer.name_or_path}', whose "
            f"vocabulary differs from the tokenizer of '{model_name}'; prepare it with the "
            "model's, or with prepare.byte_spans: true to score any tokenizer per byte"
        )
    if max_sequences is not None:
        raise DDKError(
            "--max-sequences applies to a model with the data's tokenizer; a model with "
            "another tokenizer is scored on every held-out window (omit it)"
        )


def _table(result: dict) -> str:
    """Per domain: perplexity (in the data's tokens), loss, tokens and, with byte spans, the
    perplexity per byte that compares models across tokenizers."""
    per_byte = all("ppl_byte" in r for r in result.values())
    rows = []
    for name, r in result.items():
        rows.append(
            [name, r["ppl"], r["loss"], r["tokens"]] + ([r["ppl_byte"]] if per_byte else [])
        )
    ppls = [r["ppl"] for r in result.values()]
    geo = math.exp(sum(math.log(p) for p in ppls) / len(ppls))
    total = ["geometric mean", geo, math.log(geo), sum(r["tokens"] for r in result.values())]
    if per_byte:
        total.append(math.exp(sum(math.log(r["ppl_byte"]) for r in result.values()) / len(ppls)))
    header = ["domain", "perplexity", "loss (nats)", "tokens"]
    return format_table(header + (["ppl per byte"] if per_byte else []), rows + [total])
