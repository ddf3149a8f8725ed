"""`ddk prepare | distill | cache-teacher | serve-teacher | eval | demo | report`: every command reads the same
config model; `prepare`'s flags are generated from its config section.

This is the one module that imports inside functions: each command's module (and torch,
transformers) is imported when that command runs, so `ddk --help`, `--version` and argument
errors answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import types
import typing

from pydantic import BaseModel

from ddk import __version__
from ddk.config import PrepareSection, load_config
from ddk.errors import DDKError, first_line

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


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one task name")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_or(words: tuple[str, ...]):
    def parse(text: str) -> int | str:
        if text in words:
            return text
        try:
            return int(text)
        except ValueError:
            choices = " or ".join(f"'{w}'" for w in words)
            raise argparse.ArgumentTypeError(
                f"must be a number or {choices}, got '{text}'"
            ) from None

    return parse


def _kinds(annotation) -> list:
    """The types a field accepts: a union's members, Annotated (StrictInt) unwrapped, no None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(annotation) if union else (annotation,)
    kinds = [
        typing.get_args(k)[0] if typing.get_origin(k) is typing.Annotated else k for k in kinds
    ]
    return [k for k in kinds if k is not type(None)]


def _flag_options(info) -> dict:
    """argparse options for one config field, from its annotation and description."""
    kinds = _kinds(info.annotation)
    words = tuple(
        w for k in kinds if typing.get_origin(k) is typing.Literal for w in typing.get_args(k)
    )
    options = {"help": info.description}
    if kinds == [bool]:
        return {**options, "action": argparse.BooleanOptionalAction}
    if typing.get_origin(kinds[0]) is tuple:
        return {**options, "nargs": len(typing.get_args(kinds[0])), "type": int,
                "metavar": ("LOW", "HIGH")}  # fmt: skip
    if int in kinds and words:
        return {**options, "type": _int_or(words), "metavar": "|".join(("N", *words))}
    if int in kinds:
        return {**options, "type": int}
    if words:
        return {**options, "choices": list(words)}
    return {**options, "type": str}


def add_section_flags(parser: argparse.ArgumentParser, section: type[BaseModel]) -> None:
    """One --flag per field of a config section (`--seq-len` for `seq_len`): the config model
    stays the one place an option and its help are defined."""
    for name, info in section.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, **_flag_options(info))


def section_overrides(args, section: type[BaseModel], prefix: str) -> list[str]:
    """The flags given on the command line, as `prefix.key=value` overrides."""
    return [
        f"{prefix}.{name}={json.dumps(getattr(args, name))}"
        for name in section.model_fields
        if getattr(args, name, None) is not None
    ]


def _add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="per-domain test perplexity (--data) and benchmark scores through lm-eval (--tasks)",
    )
    _add_config_args(p)
    p.add_argument(
        "--model", required=True, help="model hub id or folder, or a run folder (its final/)"
    )
    p.add_argument("--data", help="prepared data folder: per-domain perplexity")
    p.add_argument(
        "--tasks",
        type=_task_list,
        help="lm-eval tasks, comma-separated (e.g. gsm8k,mmlu); default: the run's or CONFIG's "
        "eval.tasks",
    )
    p.add_argument("--include-path", action="append", help="folder of your own lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--limit", type=float, help="examples per task (below 1: a fraction)")
    p.add_argument("--out", help="write the benchmark scores to this JSON file")
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow tasks that execute the model's code (humaneval, mbpp)",
    )
    p.add_argument("--domains", nargs="*", help="subset of domains")
    p.add_argument(
        "--batch-size", type=_positive_int, help="sequences (perplexity: 8) or requests per forward"
    )
    p.add_argument("--max-sequences", type=_positive_int, help="held-out sequences per domain")
    p.add_argument(
        "--split",
        choices=["val", "test"],
        default="test",
        help="held-out split: test (default; reporting only) or val (what DDK steers by)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_cross_demo_arguments(p) -> None:
    """`ddk demo`'s cross-tokenizer teacher (`ddk.demo.crosstok`)."""
    p.add_argument(
        "--cross-teacher",
        action="store_true",
        help="also build a teacher with another tokenizer (half the vocabulary, digits split) "
        "and distil through it (teacher.tokenizer: cross); report test perplexity per byte",
    )
    p.add_argument(
        "--cross-methods",
        nargs="+",
        default=["kd", "ddk"],
        help="methods run through the cross-tokenizer teacher (default: kd ddk); 'kd:skip' = "
        "kd with distill.cross_mismatch=skip ('kd:merge': =merge)",
    )
    p.add_argument(
        "--no-benchmarks", action="store_true", help="skip the lm-eval benchmark scoring"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddk", description="Domain-aware knowledge distillation (DDK) for Hugging Face LMs."
    )
    parser.add_argument("--version", action="version", version=f"ddk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenise a multi-domain corpus into packed shards")
    _add_config_args(p)
    add_section_flags(p, PrepareSection)

    p = sub.add_parser("distill", help="distill a teacher into a student")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")

    p = sub.add_parser(
        "cache-teacher",
        help="store the teacher's top-k and sampled tail log-probs for `teacher.mode: offline`",
    )
    _add_config_args(p, config_required=True)

    p = sub.add_parser(
        "serve-teacher",
        help="start a vLLM server for the configured teacher on 127.0.0.1 (teacher.mode: served)",
    )
    _add_config_args(p, config_required=True)

    _add_eval_parser(sub)

    _add_demo_parser(sub)
    _add_report_parser(sub)
    return parser


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a built-in corpus, nothing downloaded")
    p.add_argument("--out", default="ddk-demo", help="output folder (default ./ddk-demo)")
    p.add_argument("--cache-dir", help="where the demo teacher is cached (~/.cache/ddk/demo)")
    p.add_argument("--quick", action="store_true", help="a first look in about 3 minutes")
    p.add_argument(
        "--chat",
        action="store_true",
        help="post-training data: conversations (math Q&A, code explanation, record lookup) with "
        "an assistant-only loss; perplexities count assistant tokens",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods",
        nargs="+",
        help="methods to compare (default: cpt kd ddk ddk+robust ddk+focus equal; with --chat: "
        "kd ddk ddk+robust equal; ddk+PRESET = ddk with distill.preset=PRESET; also "
        "ddk_no_smoothing, ddk+floor = ddk with distill.init_floor=true)",
    )
    p.add_argument(
        "--init-floor-variant", action="store_true", help="also run ddk+floor (init_floor=true)"
    )
    p.add_argument(
        "--domain-teachers",
        action="store_true",
        help="also train a math teacher and a code teacher (the teacher trained longer on its "
        "own domain) and run each teacher-using method with them too (METHOD+domain); with "
        "--cross-teacher also METHOD@x+domain (code from teacher-x, math from the math teacher)",
    )
    _add_cross_demo_arguments(p)
    p.add_argument("--steps", type=int, help="distillation steps per method")
    p.add_argument("--scale", type=float, help="corpus size multiplier")
    p.add_argument("--teacher-steps", type=int, help="teacher pre-training steps")
    p.add_argument("--student-steps", type=int, help="student pre-training steps")


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="plots and a summary of one or more runs")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", help="output folder (default: the first run's report/)")
    p.add_argument(
        "--benchmarks",
        nargs="+",
        default=[],
        metavar="FILE",
        help="`ddk eval --out` files (e.g. the teacher's) shown as rows of the benchmark table",
    )


def _prepare(args) -> int:
    from ddk.data.prepare import prepare

    cfg = load_config(
        args.config, section_overrides(args, PrepareSection, "prepare") + args.overrides
    )
    tokenizer = cfg.prepare.tokenizer or cfg.model.student
    if not tokenizer:
        raise DDKError("no tokenizer: set prepare.tokenizer or model.student (or pass --tokenizer)")
    if cfg.prepare.embedder == "student" and not cfg.prepare.embed_model:
        cfg.prepare.embed_model = cfg.model.student  # None: the tokenizer folder's model
    prepare(cfg.prepare, tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    return 0


def _distill(args) -> int:
    from ddk.preflight import load_checked_config
    from ddk.run_dir import resume_run, start_run

    if args.resume:
        if args.config:
            raise DDKError("--resume RUN_DIR reads RUN_DIR/config.yaml; give no config file")
        resume_run(args.resume, args.overrides)
    else:
        if not args.config:
            raise DDKError("ddk distill needs a config file (or --resume RUN_DIR)")
        start_run(load_checked_config(args.config, args.overrides))
    return 0


def _cache_teacher(args) -> int:
    from ddk.commands.cache_teacher import build_cache

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


def _serve_teacher(args) -> int:
    from ddk.commands.serve_teacher import serve_teacher

    def _stop(signum, frame):  # SIGTERM stops the server like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return serve_teacher(load_config(args.config, args.overrides))
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _eval(args) -> int:
    from ddk.commands.eval_model import eval_command

    eval_command(args)
    return 0


def _demo(args) -> int:
    from ddk.demo.run import run_demo

    run_demo(args)
    return 0


def _report(args) -> int:
    from ddk.report import write_report

    write_report(args.runs, args.out, benchmark_files=args.benchmarks)
    return 0


COMMANDS = {
    "prepare": _prepare,
    "distill": _distill,
    "cache-teacher": _cache_teacher,
    "serve-teacher": _serve_teacher,
    "eval": _eval,
    "demo": _demo,
    "report": _report,
}


def _quiet_libraries() -> None:
    """ddk shows its own progress; transformers' per-load bars would only clutter it."""
    from transformers.utils import logging as hf_logging  # deferred: see the module docstring

    hf_logging.disable_progress_bar()


def _close_process_group() -> None:
    """Tear torch.distributed down before the interpreter does, and let gloo's worker threads
    finish first. A worker frees a finished collective (the last barrier, holding an
    all-gather's Python-owned tensors) just after the wait on it returns, and that needs the
    GIL; if this process reaches interpreter shutdown first, the worker is made to exit inside
    a C++ destructor and the process aborts ("terminate called without an active exception")
    after a run that succeeded (a core dump of a 2-process gloo run showed exactly this)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist  # deferred: torch is loaded by now, so this costs nothing

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.2)  # GIL released: a worker still freeing its last collective finishes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except DDKError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _peer_stopped(e):
            raise
        # Another rank stopped (its one line is above) and this one's collective lost it.
        print(
            "error: another process of this launch stopped (see its error); here: "
            + first_line(e)[:200],
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    finally:
        _close_process_group()


# What gloo and NCCL raise in a rank whose peer exited in the middle of a collective.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_stopped(e: BaseException) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist  # deferred: torch is loaded by now, so this costs nothing

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(e)
    return isinstance(e, dist.DistBackendError) or any(m in text for m in _PEER_GONE)


if __name__ == "__main__":
    sys.exit(main())
