"""The DDK training loop (Algorithm 1 of arXiv 2407.16154), shared by every method.

    setup:  data, the interval plan, the student, the teacher (a `TeacherSource`), AdamW and its
            schedule, the checkpointer (and a restore on --resume)
    loop:   every K steps: evaluate the student per domain, r_{t+1} by Eq. 1/Eq. 2, draw the
            interval's sequences in proportion to r (`ddk.curriculum`); each step: teacher
            signal -> CE + γ·divergence (chunked, normalised by the step's global token count)
            -> AdamW; logs, checkpoints every `save_every` steps
    finish: the final evaluation on the held-out test split, the final student with
            save_pretrained, its lm-eval benchmark scores (eval.tasks; also every
            eval.every_intervals intervals: reporting only, never steering)

Multi-GPU / multi-node runs go through Hugging Face Accelerate (`accelerate launch -m ddk.cli
distill ...`) behind `ddk.runtime`; every rank computes the same interval plan and takes its
slice of each batch. The run folder's lifecycle (new run, resume, lock) is `ddk.run_dir`'s.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddk.checkpoint import latest_good_checkpoint
from ddk.checkpointer import Checkpointer, RNGState, TrainState, seed_everything
from ddk.config import Config
from ddk.curriculum import IntervalPlan
from ddk.data.dataset import PreparedData, target_count
from ddk.errors import DDKError
from ddk.evaluate import report_split, run_perplexities
from ddk.final import save_final, whole_student
from ddk.harness import RunBenchmarks
from ddk.identity import data_fingerprint
from ddk.lora import apply_lora, trainable_weights
from ddk.losses import LossSums
from ddk.methods import method_spec
from ddk.metrics import (
    DOMAIN_UPDATE,
    FINAL_EVAL,
    DomainStats,
    EvalRecord,
    MetricsWriter,
    SkippedStep,
    StepRecord,
)
from ddk.models import embedding_rows, load_model, load_tokenizer
from ddk.preflight import preflight
from ddk.progress import StopRequest, Throughput
from ddk.ranks import print0
from ddk.runtime import Runtime
from ddk.schedule import Schedule
from ddk.step import DistillStep
from ddk.teacher import Batch
from ddk.teacher.perplexity import per_byte_perplexities, write_teacher_ppl
from ddk.teacher.source import pinned_cache, teacher_source
from ddk.trackers import start_trackers


class Trainer:
    """The recipe: setup (data, student, teacher, optimizer), then the loop, then finish."""

    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None, runtime=None):
        self.cfg, self.run_dir = cfg, run_dir
        self.runtime = rt = runtime if runtime is not None else Runtime()
        self.is_main, self.world, self.rank = rt.is_main, rt.world_size, rt.rank
        self.device = rt.device
        preflight(cfg)  # every config/data/model problem at once, before weights load
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.trainer.seed)
        self.method = method_spec(cfg.distill.method)
        self.data = PreparedData(cfg.data.prepared, cfg.data.domains)
        self.domains = self.data.names
        self.plan = IntervalPlan(cfg, self.data, self.world)
        self.step_tokens = self.plan.global_batch * self.data.seq_len  # packed: all are targets
        # Curves and Eq. 1/2 use val; the final numbers use the held-out test split.
        self.report_split = report_split(self.data, "test")
        student = self._load_student()
        rows, splits = embedding_rows(student), ("val", self.report_split)
        ahead = {"plan": self.plan, "step": lambda: self.state.step}  # a served teacher's
        self.teacher = teacher_source(cfg, self.data, rt, student_rows=rows, splits=splits, **ahead)
        self.uses_teacher = self.teacher is not None and self.method.trains_with_teacher(
            cfg.distill
        )
        self._setup_optimizer(student)
        self.state = TrainState()
        self.checkpointer = Checkpointer(
            run_dir,
            rt,
            self.step_module,
            self.optimizer,
            model=trainable_weights(self.student, cfg.model.lora),  # LoRA: adapters only
            states={
                "trainer": self.state,
                "plan": self.plan,
                "scheduler": self.schedule,
                "rng": RNGState(),
            },  # fmt: skip
            keep=cfg.trainer.keep_checkpoints,
            # What `--resume` checks the run folder's config.yaml and data against.
            record={
                "config": cfg.model_dump(mode="json"),
                "data_fingerprint": data_fingerprint(cfg.data.prepared),  # once: data is fixed
                "teacher_cache": pinned_cache(cfg),
            },
        )
        if resume_from is not None:
            self.checkpointer.load(resume_from)
        self.metrics = MetricsWriter(
            run_dir,
            start_trackers(cfg, run_dir, self.state.step) if self.is_main else None,
            enabled=self.is_main,
        )
        self._teacher_ppl: dict | None = None
        # lm-eval scores of the student in memory (reporting only); None without eval.tasks
        self.benchmarks = RunBenchmarks.for_run(
            cfg.eval, run_dir, self.student_tokenizer, rt, self.metrics
        )

    # ------------------------------------------------------------------ setup
    def _load_student(self):
        cfg = self.cfg
        self.student_tokenizer = load_tokenizer(cfg.model.student, cfg.model.trust_remote_code)
        # The student trains in float32 (master weights); bf16 comes from autocast on GPUs.
        student = load_model(
            cfg.model.student,
            dtype=torch.float32,
            what="student",
            trust_remote_code=cfg.model.trust_remote_code,
        )
        if cfg.trainer.gradient_checkpointing:
            # Non-reentrant checkpointing is the kind FSDP2 and DDP both support.
            student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        # from_pretrained returns eval mode: without this, dropout and gradient
        # checkpointing (which HF applies only in training mode) would silently be off.
        student.train()
        return apply_lora(student, cfg.model.lora, self.runtime.backend)  # None: full FT

    def _setup_optimizer(self, student) -> None:
        t, rt = self.cfg.trainer, self.runtime
        trainable = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
        )
        self.step_module, self.optimizer = rt.prepare_training(
            DistillStep(student, self.cfg, self.data.vocab_size),
            optimizer,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            grad_clip=t.grad_clip,
        )
        head = student.get_output_embeddings()
        rt.register_external(
            rt.unwrap(self.step_module), [head.weight, getattr(head, "bias", None)]
        )
        self.schedule = Schedule(self.optimizer, t)

    @property
    def student(self):
        """The student model (unwrapped: its parameters may be shards)."""
        return self.runtime.unwrap(self.step_module).student

    @property
    def teacher_model(self):
        """The live teacher model, or None (offline, or a method that trains without it)."""
        return getattr(self.teacher, "model", None)

    # ------------------------------------------------------------------ evaluation
    def evaluate_student(self) -> dict[str, dict]:
        """On the validation split: what Eq. 1/2 and the curves use."""
        return self.evaluate_student_on("val")

    def evaluate_student_on(self, split: str) -> dict[str, dict]:
        rt = self.runtime
        with rt.gathered(self.step_module):
            return run_perplexities(
                self.cfg, self.student, self.data, split, rt, gather_head=rt.gathered_head
            )

    def teacher_perplexities(self) -> dict[str, dict[str, float]] | None:
        """{split: {domain: ppl}} on val (what Eq. 1/2 use) and the report split, from the
        teacher source (caches or computed) once; recorded in RUN/teacher_ppl.json."""
        if self._teacher_ppl is None and self.teacher is not None:
            splits = tuple(dict.fromkeys(("val", self.report_split)))
            ppl = {s: self.teacher.perplexities(s) for s in splits}
            if any(v is None for v in ppl.values()):
                return None
            if self.is_main:
                source = {s: self.teacher.ppl_source.get(s) for s in splits}
                per_byte = per_byte_perplexities(self.teacher, splits)
                write_teacher_ppl(self.run_dir, self.teacher.ppl_key, source, ppl, per_byte)
            self._teacher_ppl = ppl
        return self._teacher_ppl

    def _eval_record(self, event: str, student: dict, teacher: dict | None) -> EvalRecord:
        s_ppl = np.array([student[d]["ppl"] for d in self.domains], dtype=np.float64)
        ratios = [None] * len(self.domains)
        if teacher:
            # NaN/inf stay NaN/inf in the log (a baseline goes on; DDK stopped before this)
            with np.errstate(all="ignore"):
                ratios = s_ppl / np.array([teacher[d] for d in self.domains], dtype=np.float64)
        domains = {
            d: DomainStats(
                student_ppl=float(s_ppl[i]),
                teacher_ppl=teacher[d] if teacher else None,
                ratio=float(ratios[i]) if teacher else None,
                weight=float(self.plan.weights[i]),
            )
            for i, d in enumerate(self.domains)
        }
        return EvalRecord(
            event, self.state.step, self.plan.interval, domains, targets=self.data.targets
        )

    def begin_interval(self) -> None:
        """Algorithm 1 steps 1/4: evaluate the student, set r_t (Eq. 1 or Eq. 2), draw the
        interval's sequences, and log it all."""
        started = time.perf_counter()
        student = self.evaluate_student()
        teacher = self.teacher_perplexities()
        self.plan.begin_interval(
            {d: student[d]["ppl"] for d in self.domains}, teacher["val"] if teacher else None
        )
        record = self._eval_record(DOMAIN_UPDATE, student, teacher["val"] if teacher else None)
        record.eval_seconds = round(time.perf_counter() - started, 3)
        for d, rows, epochs in zip(self.domains, self.plan.rows_per_domain(), self.plan.epochs()):
            record.domains[d].rows, record.domains[d].epochs = rows, epochs
        self.metrics.write(record)
        if self.benchmarks is not None and self.benchmarks.due(self.plan.interval):
            model, _ = whole_student(self.runtime, self.step_module, self.cfg.model)  # collective
            self.benchmarks.record(model, self.state.step)

    # ------------------------------------------------------------------ training
    def train_step(self, stop_requested: bool = False) -> dict:
        """One optimizer step over this rank's micro-batches; every returned number is the
        global batch's (all-reduced)."""
        rt = self.runtime
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        sums[3] = float(stop_requested)
        micro_batches = self.plan.rows(self.state.step, self.rank)
        batches = [self.data.train_batch(rows, self.domains, self.device) for rows in micro_batches]
        targets = self.step_tokens  # packed raw text: every position is a target
        if self.data.masked:  # chat data: the loss mask's targets over the whole step
            targets = float(rt.reduce_sum(target_count(batches, self.device)).clamp_min(1))
        for i, (rows, (input_ids, labels, positions)) in enumerate(zip(micro_batches, batches)):
            signal = Batch(input_ids, rows, positions)
            teacher = self.teacher.signal(signal) if self.uses_teacher else None
            with rt.no_sync(self.step_module, skip_sync=i < len(micro_batches) - 1):
                out: LossSums = self.step_module(input_ids, labels, teacher, positions)
                # DDP averages gradients over ranks; scale so the result is sum / global targets.
                rt.backward(out.total * (self.world / targets))
            sums[:3] += torch.stack(
                [out.total.detach().double(), out.ce.double(), out.div.double()]
            )
        sums = rt.reduce_sum(sums)
        # The norm is needed either way: a NaN/inf gradient skips the step.
        max_norm = self.cfg.trainer.grad_clip if self.cfg.trainer.grad_clip > 0 else math.inf
        grad_norm, applied = rt.optimizer_step(
            self.step_module, self.optimizer, max_norm, loss_finite=math.isfinite(float(sums[0]))
        )
        s = self.state
        s.bad_steps_total += not applied
        s.bad_steps_in_a_row = 0 if applied else s.bad_steps_in_a_row + 1
        lr = self.schedule.last_lr()  # the rate this step used
        self.schedule.step()
        s.step += 1
        s.tokens_seen += self.step_tokens  # positions read, padding of chat rows included
        return {
            "lr": lr,
            "loss": float(sums[0]) / targets,
            "ce": float(sums[1]) / targets,
            "kl": float(sums[2]) / targets,
            "grad_norm": grad_norm,
            "skipped": not applied,
            "stop": float(sums[3]) > 0,
        }

    def save(self) -> Path | None:
        return self.checkpointer.save(self.state.step)

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path | None:
        """Run to trainer.max_steps; the final model's folder, or None when a signal stopped it."""
        t = self.cfg.trainer
        self.teacher_perplexities()  # once, before anything else is evaluated
        if not self.plan.started and not self.state.before:  # the student before training
            before = self.evaluate_student_on(self.report_split)
            self.state.before = {d: before[d]["ppl"] for d in self.domains}
        bar = tqdm(
            total=t.max_steps,
            initial=self.state.step,
            desc=f"distill [{self.cfg.distill.method}]",
            dynamic_ncols=True,
            unit="step",
            # `disable` only off rank 0: passing it always would override TQDM_DISABLE.
            **({} if self.is_main else {"disable": True}),
        )
        window = Throughput()
        try:
            with bar, StopRequest() as stop:
                while self.state.step < t.max_steps:
                    if self.plan.due(self.state.step):
                        self.begin_interval()
                    logs = self.train_step(stop_requested=stop.signal_name is not None)
                    self._check_bad_steps(logs)
                    window.add(self.step_tokens)
                    bar.update(1)
                    self._log(logs, window, bar)
                    if self.state.step % t.save_every == 0 and self.state.step < t.max_steps:
                        self.save()
                    # Every rank sees the same (all-reduced) flag, so all stop at the same step.
                    if logs["stop"] and self.state.step < t.max_steps:
                        self._stop(stop.signal_name)
                        return None
            return self.finish()
        finally:
            self.metrics.close()

    def _check_bad_steps(self, logs: dict) -> None:
        s = self.state
        if logs["skipped"]:
            self.metrics.write(
                SkippedStep(s.step, logs["loss"], logs["grad_norm"], s.bad_steps_in_a_row)
            )
        if s.bad_steps_in_a_row > self.cfg.trainer.max_bad_steps:
            raise DDKError(
                f"{s.bad_steps_in_a_row} steps in a row had a NaN/inf loss or gradient (at step "
                f"{s.step}); lower trainer.lr or check the data. {self._checkpoint_note()}"
            )

    def _log(self, logs: dict, window: Throughput, bar) -> None:
        t, s = self.cfg.trainer, self.state
        if s.step % t.log_every != 0 and s.step != t.max_steps:
            return
        record = StepRecord(
            step=s.step,
            tokens=s.tokens_seen,
            **{k: v for k, v in logs.items() if k != "stop"},
            tokens_per_s=window.rate(),
            bad_steps=s.bad_steps_total,
        )
        if self.device.type == "cuda":  # this rank's peak, for sizing runs
            record.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.write(record)
        bar.set_postfix(loss=f"{record.loss:.3f}", tok_s=f"{record.tokens_per_s:.0f}")
        window.reset()

    def _stop(self, signal_name: str | None) -> None:
        path = self.save()
        print0(
            f"{signal_name or 'a stop signal'} received: saved {path} at step "
            f"{self.state.step}. Resume with: ddk distill --resume {self.run_dir}"
        )

    def _checkpoint_note(self) -> str:
        """What a user can resume from, stated only from what is on disk."""
        good = latest_good_checkpoint(self.run_dir, log=lambda _msg: None)
        if good is None:
            return "No checkpoint was written yet: the run must start again"
        return f"The last good checkpoint ({good.name}) is intact"

    def finish(self) -> Path:
        """The final evaluation on the report split, a last checkpoint, and RUN/final."""
        student = self.evaluate_student_on(self.report_split)
        teacher = self.teacher_perplexities()
        record = self._eval_record(
            FINAL_EVAL, student, teacher[self.report_split] if teacher else None
        )
        record.split = self.report_split
        for d in self.domains:
            record.domains[d].student_before_ppl = self.state.before.get(d)
        self.metrics.write(record)
        saved = self.save()
        final = self.run_dir / "final"
        # Sharded backends gather one whole state dict (a collective), so final/ is always a
        # plain save_pretrained folder.
        model, adapter = whole_student(self.runtime, self.step_module, self.cfg.model, saved)
        if self.is_main:
            model.config.use_cache = True  # generation wants the KV cache back
            save_final(self.run_dir, model, self.student_tokenizer, adapter)
        print0(f"final student saved to {final}")
        self.runtime.barrier()
        if self.benchmarks is not None:  # after the save; the other ranks finish meanwhile
            self.benchmarks.record(model, self.state.step, final=True, wait=False)
        return final
