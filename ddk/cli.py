"""`ddk prepare | distill | cache-teacher | eval | demo | report`: every command reads the same config model."""

from __future__ import annotations

import argparse
import json
import sys

from ddk import __version__
from ddk.config import ConfigError, load_config
from ddk.errors import DDKError

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument(
        "config", nargs=None if config_required else "?", help="YAML config (the ddk.config schema)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set trainer.lr=1e-4 (repeatable)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _auto_domains(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddk", description="Domain-aware knowledge distillation (DDK) for Hugging Face LMs."
    )
    parser.add_argument("--version", action="version", version=f"ddk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenise a multi-domain corpus into packed shards")
    _add_config_args(p)
    p.add_argument("--input", help="corpus: folder of domain folders, JSONL/Parquet, or dataset")
    p.add_argument("--output", help="folder to write the prepared data to")
    p.add_argument("--tokenizer", help="tokenizer hub id or folder (default: model.student)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--val-sequences", type=int, help="validation sequences per domain")
    p.add_argument("--text-field")
    p.add_argument("--domain-field")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output folder that ddk prepared (never other files)",
    )
    p.add_argument(
        "--auto-domains",
        type=_auto_domains,
        metavar="N|auto",
        help="no labels: cluster documents into N domains ('auto': pick N from the merge tree)",
    )
    p.add_argument("--split-domains", type=int, metavar="N", help="split each domain in up to N")
    p.add_argument("--embedder", choices=["hashing", "student"], help="features for clustering")
    p.add_argument("--cluster-sample", type=int, help="documents sampled to fit the clustering")
    p.add_argument(
        "--exclude-heldout", metavar="PREPARED", help="drop documents PREPARED holds out (val/test)"
    )

    p = sub.add_parser("distill", help="distill a teacher into a student")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")

    p = sub.add_parser(
        "cache-teacher", help="store the teacher's top-k log-probs for `teacher.mode: offline`"
    )
    _add_config_args(p, config_required=True)

    p = sub.add_parser("eval", help="per-domain test (or validation) perplexity of a model")
    p.add_argument("--model", required=True, help="model hub id or folder")
    p.add_argument("--data", required=True, help="prepared data folder")
    p.add_argument("--domains", nargs="*", help="subset of domains")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-sequences", type=_positive_int, help="held-out sequences per domain")
    p.add_argument(
        "--split",
        choices=["val", "test"],
        default="test",
        help="held-out split: test (default; reporting only) or val (what DDK steers by)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("demo", help="the whole pipeline on a built-in corpus, nothing downloaded")
    p.add_argument("--out", default="ddk-demo", help="output folder (default ./ddk-demo)")
    p.add_argument("--cache-dir", help="where the demo teacher is cached (~/.cache/ddk/demo)")
    p.add_argument("--quick", action="store_true", help="a first look in about 3 minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["cpt", "kd", "ddk", "equal"],
        help="methods to compare (default: cpt kd ddk equal; also ddk_no_smoothing, ddk+floor = "
        "ddk with distill.init_floor=true)",
    )
    p.add_argument(
        "--init-floor-variant", action="store_true", help="also run ddk+floor (init_floor=true)"
    )
    p.add_argument("--steps", type=int, help="distillation steps per method")
    p.add_argument("--scale", type=float, help="corpus size multiplier")
    p.add_argument("--teacher-steps", type=int, help="teacher pre-training steps")
    p.add_argument("--student-steps", type=int, help="student pre-training steps")

    p = sub.add_parser("report", help="plots and a summary of one or more runs")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", help="output folder (default: the first run's report/)")
    return parser


def _prepare(args) -> int:
    from ddk.data.prepare import prepare

    flags = {
        "input": args.input,
        "output": args.output,
        "tokenizer": args.tokenizer,
        "seq_len": args.seq_len,
        "val_sequences": args.val_sequences,
        "text_field": args.text_field,
        "domain_field": args.domain_field,
        "auto_domains": args.auto_domains,
        "split_domains": args.split_domains,
        "embedder": args.embedder,
        "cluster_sample": args.cluster_sample,
        "exclude_heldout": args.exclude_heldout,
    }
    overrides = [f"prepare.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if args.overwrite:
        overrides.append("prepare.overwrite=true")
    cfg = load_config(args.config, overrides + args.overrides)
    tokenizer = cfg.prepare.tokenizer or cfg.model.student
    if not tokenizer:
        raise DDKError("no tokenizer: set prepare.tokenizer or model.student (or pass --tokenizer)")
    if cfg.prepare.embedder == "student" and not cfg.prepare.embed_model:
        cfg.prepare.embed_model = cfg.model.student  # None: the tokenizer folder's model
    prepare(cfg.prepare, tokenizer)
    return 0


def _distill(args) -> int:
    from ddk.trainer import resume_run, start_run

    if args.resume:
        if args.config:
            raise DDKError("--resume RUN_DIR reads RUN_DIR/config.yaml; give no config file")
        resume_run(args.resume, args.overrides)
    else:
        if not args.config:
            raise DDKError("ddk distill needs a config file (or --resume RUN_DIR)")
        from ddk.preflight import load_checked_config

        start_run(load_checked_config(args.config, args.overrides))
    return 0


def _cache_teacher(args) -> int:
    import signal

    from ddk.teacher.cache import build_cache

    def _stop(signum, frame):  # preemption (SIGTERM) ends like Ctrl-C: finished shards stay
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        build_cache(load_config(args.config, args.overrides))
    except KeyboardInterrupt:
        print(
            "interrupted: the finished shards are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _eval(args) -> int:
    from ddk.evaluate import evaluate_model_cli

    evaluate_model_cli(
        args.model,
        args.data,
        domains=args.domains,
        batch_size=args.batch_size,
        max_sequences=args.max_sequences,
        as_json=args.json,
        split=args.split,
    )
    return 0


def _demo(args) -> int:
    from ddk.demo.run import run_demo

    run_demo(args)
    return 0


def _report(args) -> int:
    from ddk.report import write_report

    write_report(args.runs, args.out)
    return 0


COMMANDS = {
    "prepare": _prepare,
    "distill": _distill,
    "cache-teacher": _cache_teacher,
    "eval": _eval,
    "demo": _demo,
    "report": _report,
}


def _quiet_libraries() -> None:
    """ddk shows its own progress; transformers' per-load bars would only clutter it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _close_process_group() -> None:
    """Tear torch.distributed down before the interpreter does: left to interpreter shutdown,
    gloo's worker threads can be destroyed while joinable, and the process then aborts
    ("terminate called without an active exception") after a run that succeeded."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except (DDKError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


if __name__ == "__main__":
    sys.exit(main())
