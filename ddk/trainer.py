"""The DDK training loop (Algorithm 1 of arXiv 2407.16154), shared by every method.

    setup:  load models + data, check vocabularies, teacher perplexities (once, cached),
            student perplexities -> r_0 (Eq. 1 for DDK, a fixed mixture for baselines)
    loop:   every K steps: evaluate the student per domain, r_{t+1} by Eq. 2, draw the
            interval's sequences in proportion to r; each step: teacher signal ->
            CE + γ·divergence (chunked, normalised by the step's global token count) -> AdamW
    save:   checkpoints every `save_every` steps, the final student with save_pretrained.

Multi-GPU / multi-node runs go through Hugging Face Accelerate (`accelerate launch -m ddk.cli
distill ...`); every rank computes the same interval plan and takes its slice of each batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddk.checkpoint import (
    DEEPSPEED,
    SHARDED,
    agreed_latest_good_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sharded_states_dir,
)
from ddk.config import Config, ConfigError, load_config
from ddk.data.dataset import PreparedData
from ddk.domains import fixed_mixture, next_weights
from ddk.errors import DDKError
from ddk.evaluate import report_split, run_perplexities
from ddk.final import save_final
from ddk.logits import LogitTransform, logit_transform
from ddk.losses import FusedDistillLoss, LossSums
from ddk.methods import method_spec
from ddk.metrics import DOMAIN_UPDATE, FINAL_EVAL, MetricsWriter, truncate_metrics
from ddk.models import embedding_rows, hidden_and_head
from ddk.preflight import preflight
from ddk.resume import data_fingerprint
from ddk.runtime import Runtime, plain_copy
from ddk.sampler import DomainSampler
from ddk.schedule import lr_lambda
from ddk.teacher import Batch, OnlineTeacher
from ddk.teacher.placement import load_placed_teacher


class DistillStep(torch.nn.Module):
    """The student plus the fused loss, as one module, so DDP sees a single forward."""

    def __init__(
        self,
        student,
        cfg: Config,
        vocab_size: int,
        teacher_transform: LogitTransform | None = None,
    ):
        super().__init__()
        self.student = student
        self.student_transform = logit_transform(student)
        self.teacher_transform = teacher_transform
        d = cfg.distill
        # Hinton-style KD multiplies the divergence by τ² (opt-in); DDK's Eq. 3 does not.
        gamma = d.gamma * d.tau**2 if d.tau_squared else d.gamma
        self.loss = FusedDistillLoss(
            vocab_size,
            gamma=gamma,
            tau=d.tau,
            divergence=d.divergence if method_spec(d.method).uses_divergence else "none",
            skew_lambda=d.skew_lambda,
            chunk_tokens=d.loss_chunk_tokens,
        )

    def forward(self, input_ids, labels, teacher=None) -> LossSums:
        """``teacher``: a DenseSignal, a SparseSignal (offline cache) or None."""
        hidden, head = hidden_and_head(self.student, input_ids)
        return self.loss(
            hidden.reshape(-1, hidden.shape[-1]),
            head.weight,
            labels.reshape(-1),
            teacher,
            getattr(head, "bias", None),
            student_transform=self.student_transform,
            teacher_transform=self.teacher_transform,  # None offline: the cache applied it
        )

    @property
    def _no_split_modules(self):
        # Accelerate's FSDP2 TRANSFORMER_BASED_WRAP shards the student's decoder layers.
        return getattr(self.student, "_no_split_modules", None)

    def tie_weights(self) -> None:
        # Accelerate re-ties after FSDP2's meta-device loading (fsdp_cpu_ram_efficient_loading).
        self.student.tie_weights()

    @property
    def uses_teacher(self) -> bool:
        return self.loss.divergence != "none" and self.loss.gamma != 0


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must restore for an exact resume."""

    step: int = 0  # optimizer steps completed
    interval: int = 0
    weights: list[float] = field(default_factory=list)
    sampler: dict = field(default_factory=dict)  # sampler state after drawing `plan`
    tokens_seen: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    geometry: dict = field(default_factory=dict)  # what the saved plan and positions assume
    before: dict = field(default_factory=dict)  # student perplexity on the report split at step 0
    last_val_ppl: list[float] = field(default_factory=list)  # at the last update (gap_trend)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Rank 0 saved every GPU it saw; a resume on a smaller node sees fewer.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopRequest:
    """SIGINT/SIGTERM (e.g. cluster preemption) ask the loop to save and exit at a step boundary."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """The recipe: setup (data, student, teacher, optimizer), then the loop, then save."""

    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.runtime = Runtime()
        rt = self.runtime
        self.is_main = rt.is_main
        self.world = rt.world_size
        self.rank = rt.rank
        self.device = rt.device
        preflight(cfg)  # every config/data/model problem at once, before weights load
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(cfg.trainer.seed)
        self._setup_data()
        self._setup_student()
        self._setup_teacher()
        self._setup_optimizer()
        self.state = TrainState(geometry=self._geometry())
        self.plan: np.ndarray | None = None
        if resume_from is not None:
            self._restore(resume_from)
        self.metrics = MetricsWriter(
            run_dir, cfg.trainer.report_to, enabled=self.is_main, purge_step=self.state.step or None
        )

    # ------------------------------------------------------------------ setup
    def _setup_data(self) -> None:
        cfg = self.cfg
        self.method = method_spec(cfg.distill.method)
        self.data = PreparedData(cfg.data.prepared, cfg.data.domains)
        self.data_fingerprint = data_fingerprint(cfg.data.prepared)  # once: the data is fixed
        self.domains = self.data.names
        self.vocab_size = self.data.vocab_size
        self.fixed = None
        if self.method.fixed_mixture:
            try:
                self.fixed = fixed_mixture(
                    self.domains, cfg.distill.mixture, self.data.train_tokens()
                )
            except ValueError as e:
                raise ConfigError(f"distill.mixture: {e}") from None
        t = cfg.trainer
        self.sampler = DomainSampler(
            {n: s.num_train_sequences for n, s in self.data.domains.items()}, t.seed
        )
        self.global_batch = t.micro_batch_size * t.grad_accum_steps * self.world
        self.step_tokens = self.global_batch * self.data.seq_len  # packed: all are targets
        check_plan_size(cfg.distill.K, t.max_steps, self.global_batch)
        if cfg.distill.K > t.max_steps and self.is_main and self.method.teacher_for_weights:
            print(
                f"warning: distill.K {cfg.distill.K} > trainer.max_steps {t.max_steps}: the "
                "domain weights are set once and never updated; lower distill.K"
            )

    def _setup_student(self) -> None:
        from ddk.models import load_model, load_tokenizer

        cfg = self.cfg
        self.student_tokenizer = load_tokenizer(cfg.model.student, cfg.model.trust_remote_code)
        # The student trains in float32 (master weights); bf16 comes from autocast on GPUs.
        self.student = load_model(
            cfg.model.student,
            dtype=torch.float32,
            what="student",
            trust_remote_code=cfg.model.trust_remote_code,
        )
        if cfg.trainer.gradient_checkpointing:
            # Non-reentrant checkpointing is the kind FSDP2 and DDP both support.
            self.student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        # from_pretrained returns eval mode: without this, dropout and gradient
        # checkpointing (which HF applies only in training mode) would silently be off.
        self.student.train()

    def _setup_teacher(self) -> None:
        from ddk.models import check_vocab, embedding_rows, resolve_dtype

        cfg = self.cfg
        teacher = None
        if cfg.teacher.mode == "offline" and self.method.teacher_for_training:
            from ddk.teacher.cache import OfflineTeacher

            # No teacher model at all: the signal and the perplexities come from the cache.
            check_vocab(self.vocab_size, None, embedding_rows(self.student))
            self.teacher_model = None
            self.teacher = OfflineTeacher(cfg.teacher.cache, self.domains, self.device)
            return
        # cpt trains on CE alone: its teacher (optional) only gives perplexities, loaded later.
        if cfg.model.teacher and self.method.teacher_for_training:
            teacher = load_placed_teacher(
                cfg.model.teacher,
                dtype=resolve_dtype(cfg.model.dtype, self.device),
                trust_remote_code=cfg.model.trust_remote_code,
                requested=cfg.teacher.placement,
                runtime=self.runtime,
            )
        check_vocab(
            self.vocab_size,
            embedding_rows(teacher) if teacher is not None else None,
            embedding_rows(self.student),
        )
        self.teacher = None
        self.teacher_model = teacher
        if teacher is not None:
            self.teacher = OnlineTeacher(teacher, self.runtime.autocast)

    def _setup_optimizer(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        self.step_module = DistillStep(
            self.student,
            cfg,
            self.vocab_size,
            logit_transform(self.teacher_model) if self.teacher_model is not None else None,
        )
        decay = [p for n, p in self.student.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.student.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
        )
        self.step_module, self.optimizer = self.runtime.prepare_training(
            self.step_module,
            optimizer,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            grad_clip=t.grad_clip,
        )
        head = self.student.get_output_embeddings()
        self.runtime.register_external(
            self.runtime.unwrap(self.step_module), [head.weight, getattr(head, "bias", None)]
        )
        # On the prepared optimizer, whose param_groups always resolve to those that step (a
        # backend may swap the optimizer, e.g. DeepSpeedCPUAdam under ZeRO offload, whose
        # load_state_dict installs new groups). The scheduler itself stays unwrapped:
        # Accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps),
        )
        self.uses_teacher = (
            self.teacher is not None and self.runtime.unwrap(self.step_module).uses_teacher
        )

    # ------------------------------------------------------------------ evaluation
    def _unwrapped_student(self):
        return self.runtime.unwrap(self.step_module).student

    def evaluate_student(self) -> dict[str, dict]:
        """On the validation split: what Eq. 1/2 and the curves use."""
        return self.evaluate_student_on("val")

    def evaluate_student_on(self, split: str) -> dict[str, dict]:
        rt = self.runtime
        with rt.gathered(self.step_module):
            return run_perplexities(
                self.cfg,
                self._unwrapped_student(),
                self.data,
                split,
                rt.autocast,
                gather_head=rt.gathered_head,
            )

    def teacher_perplexities(self) -> dict[str, float] | None:
        """{domain: ppl} on the validation split (what Eq. 1/2 use); None without a teacher."""
        result = self.teacher_perplexities_by_split(("val",))
        return result["val"] if result else None

    def teacher_perplexities_by_split(self, splits: tuple[str, ...]) -> dict[str, dict] | None:
        """{split: {domain: ppl}}: from the shared cache or computed once (ddk.teacher_ppl)."""
        from ddk.fileutil import write_json_atomic
        from ddk.teacher_ppl import teacher_perplexities

        if self.teacher is not None and self.teacher_model is None:  # offline
            cached = {s: self.teacher.perplexities(s) for s in dict.fromkeys(splits)}
            if all(v is not None for v in cached.values()):  # computed by `ddk cache-teacher`
                if self.is_main:
                    write_json_atomic(
                        self.run_dir / "teacher_ppl.json",
                        {
                            "key": {"teacher_cache": str(self.teacher.folder)},
                            "source": {s: "teacher cache" for s in cached},
                            "ppl": cached,
                        },
                    )
                return cached

        return teacher_perplexities(
            self.cfg,
            self.data,
            self.domains,
            splits,
            runtime=self.runtime,
            teacher_model=self.teacher_model,
            student_rows=embedding_rows(self.student),
            run_dir=self.run_dir,
        )

    def _domain_event(self, event: str, student: dict, teacher: dict | None, weights) -> dict:
        s_ppl = np.array([student[d]["ppl"] for d in self.domains], dtype=np.float64)
        ratios = None
        if teacher:
            # NaN/inf stay NaN/inf in the log (a baseline goes on; DDK stopped before this)
            with np.errstate(all="ignore"):
                ratios = s_ppl / np.array([teacher[d] for d in self.domains], dtype=np.float64)
        return {
            "event": event,
            "step": self.state.step,
            "interval": self.state.interval,
            "domains": {
                d: {
                    "student_ppl": float(s_ppl[i]),
                    "teacher_ppl": teacher[d] if teacher else None,
                    "ratio": float(ratios[i]) if ratios is not None else None,
                    "weight": float(weights[i]),
                }
                for i, d in enumerate(self.domains)
            },
        }

    def _warn_bad_evaluation(self, student: dict) -> None:
        """Baselines do not steer by perplexity: a NaN/inf one is logged, not fatal."""
        bad = [d for d in self.domains if not math.isfinite(student[d]["ppl"])]
        if bad and self.is_main:
            print(
                f"warning: student perplexity is NaN/inf on {', '.join(bad)} at step "
                f"{self.state.step}; {self.cfg.distill.method} does not use it, logged as NaN"
            )

    def _sampler_report(self, record: dict, weights) -> None:
        """Rows planned per domain for this interval and epochs handed out so far, with one
        warning per starved domain (Eq. 1 has no floor) and per domain past max epochs."""
        n = len(self.plan)  # the rows just drawn (only the steps that will run)
        counts = np.bincount(self.plan[:, 0], minlength=len(self.domains))
        limit = self.cfg.distill.max_domain_epochs
        warned = self.__dict__.setdefault("_epoch_warned", set())
        for i, d in enumerate(self.domains):
            epochs = self.sampler.epochs_completed(d)
            record["domains"][d]["rows"] = int(counts[i])
            record["domains"][d]["epochs"] = epochs
            if not self.is_main:
                continue
            # a fixed mixture never changes: its zero rows are said once, at interval 0
            repeat = self.method.teacher_for_weights or self.state.interval == 0
            if counts[i] == 0 and repeat:
                print(
                    f"warning: domain '{d}' gets 0 of {n} sequences in interval "
                    f"{self.state.interval} (weight {float(weights[i]):.2g}; Eq. 1 has no floor, "
                    "distill.init_floor=true adds one)"
                )
            if epochs > limit and d not in warned:
                warned.add(d)
                print(
                    f"warning: domain '{d}' has been repeated for {epochs} epochs (more than "
                    f"distill.max_domain_epochs={limit}); add data to it or expect memorisation"
                )

    def update_domain_weights(self) -> None:
        """Algorithm 1 steps 1/4: evaluate, set r_t (Eq. 1 or Eq. 2), draw the interval."""
        cfg = self.cfg.distill
        started = time.perf_counter()
        student = self.evaluate_student()
        if not self.method.teacher_for_weights:
            self._warn_bad_evaluation(student)
        s_ppl = [student[d]["ppl"] for d in self.domains]
        t_ppl = [self.teacher_ppl[d] for d in self.domains] if self.teacher_ppl else None
        try:
            weights = next_weights(
                cfg.method,
                self.state.interval,
                self.state.weights or None,
                s_ppl,
                t_ppl,
                cfg.alpha,
                self.fixed,
                domains=self.domains,
                steering=cfg.steering(),
                previous_student_ppl=self.state.last_val_ppl or None,
            )
        except ValueError as e:
            raise DDKError(f"cannot update domain weights at step {self.state.step}: {e}") from None
        self.state.weights = [float(w) for w in weights]
        if self.method.teacher_for_weights:  # the baselines' perplexities may be NaN
            self.state.last_val_ppl = [float(p) for p in s_ppl]
        record = self._domain_event(DOMAIN_UPDATE, student, self.teacher_ppl, weights)
        record["eval_seconds"] = round(time.perf_counter() - started, 3)
        self.plan = self.sampler.plan_interval(
            self.state.interval, weights, self._interval_steps() * self.global_batch
        )
        self.state.sampler = self.sampler.state_dict()
        self._sampler_report(record, weights)
        self.metrics.write(record)

    def _interval_steps(self) -> int:
        """Steps of the current interval that will run: the last one may end at max_steps."""
        K = self.cfg.distill.K
        return max(1, min(K, self.cfg.trainer.max_steps - self.state.interval * K))

    def _extend_plan(self) -> None:
        """A resume with a larger trainer.max_steps needs more of the current interval's rows."""
        have = len(self.plan) // self.global_batch
        more = self._interval_steps() - have
        if more > 0:
            extra = self.sampler.plan_interval(
                self.state.interval, self.state.weights, more * self.global_batch
            )
            self.plan = np.concatenate([self.plan, extra])
            self.state.sampler = self.sampler.state_dict()

    # ------------------------------------------------------------------ training
    def _step_batches(self):
        """This rank's micro-batches of the current step."""
        t = self.cfg.trainer
        if len(self.plan) < (self.state.step % self.cfg.distill.K + 1) * self.global_batch:
            self._extend_plan()
        rows = self.sampler.step_rows(
            self.plan, self.state.step, self.cfg.distill.K, self.global_batch
        )
        rows = rows.reshape(t.grad_accum_steps, self.world, t.micro_batch_size, 2)[:, self.rank]
        batches = []
        for micro in rows:
            seqs = torch.cat(
                [self.data.domains[self.domains[d]].sequences("train", [i]) for d, i in micro]
            )
            batches.append((seqs, micro))  # micro: each row's (domain index, sequence index)
        return batches

    def train_step(self, stop_requested: bool = False) -> dict:
        rt = self.runtime
        batches = self._step_batches()
        global_tokens = self.step_tokens
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        sums[3] = float(stop_requested)
        for i, (seqs, rows) in enumerate(batches):
            seqs = seqs.to(self.device)
            input_ids, labels = seqs[:, :-1], seqs[:, 1:]
            teacher = self.teacher.signal(Batch(input_ids, rows)) if self.uses_teacher else None
            last = i == len(batches) - 1
            with rt.no_sync(self.step_module, skip_sync=not last):
                out: LossSums = self.step_module(input_ids, labels, teacher)
                # DDP averages gradients over ranks; scale so the result is sum / global tokens.
                rt.backward(out.total * (self.world / global_tokens))
            sums[:3] += torch.stack(
                [out.total.detach().double(), out.ce.double(), out.div.double()]
            )
        sums = rt.reduce_sum(sums)
        # The norm is needed either way: a NaN/inf gradient skips the step.
        max_norm = self.cfg.trainer.grad_clip if self.cfg.trainer.grad_clip > 0 else math.inf
        grad_norm, finite = rt.optimizer_step(
            self.step_module, self.optimizer, max_norm, loss_finite=math.isfinite(float(sums[0]))
        )
        if finite:
            self.state.bad_steps_in_a_row = 0
        else:
            self.state.bad_steps_total += 1
            self.state.bad_steps_in_a_row += 1
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += global_tokens
        return {
            "lr": lr,
            "loss": float(sums[0]) / global_tokens,
            "ce": float(sums[1]) / global_tokens,
            "kl": float(sums[2]) / global_tokens,
            "grad_norm": grad_norm,
            "skipped": not finite,
            "stop": float(sums[3]) > 0,
        }

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        self.runtime.barrier()
        if self.runtime.is_sharded:
            return self._save_sharded()
        path = None
        if self.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.state.step,
                model=self._unwrapped_student(),
                optimizer_state=self.optimizer.state_dict(),
                state=self._checkpoint_state(),
                arrays={"plan": self.plan},
                rng_state=_rng_state(),
                keep=self.cfg.trainer.keep_checkpoints,
            )
        self.runtime.barrier()
        return path

    def _checkpoint_state(self) -> dict:
        """The JSON part of a checkpoint, the same under every backend."""
        return {
            "trainer": dict(self.state.__dict__),
            "scheduler": self.scheduler.state_dict(),
            # What `--resume` checks the run folder's config.yaml and data against.
            "config": self.cfg.model_dump(mode="json"),
            "data_fingerprint": self.data_fingerprint,
        }

    def _save_sharded(self) -> Path | None:
        """Every rank writes its shard (torch.distributed.checkpoint) into rank 0's temporary
        folder; rank 0 then adds the rest, the checksums, and renames it into place."""
        rt = self.runtime
        tmp = rt.broadcast_object(
            begin_checkpoint(self.run_dir, self.state.step) if self.is_main else None
        )
        rt.save_states(tmp / rt.states_dirname, self.step_module, self.optimizer)
        rt.barrier()
        path = None
        if self.is_main:
            path = commit_checkpoint(
                self.run_dir,
                self.state.step,
                tmp,
                state=self._checkpoint_state(),
                arrays={"plan": self.plan},
                rng_state=_rng_state(),
                keep=self.cfg.trainer.keep_checkpoints,
            )
        rt.barrier()
        return path

    def _geometry(self) -> dict:
        return {
            "sequences_per_step": self.global_batch,
            "processes": self.world,
            "K": self.cfg.distill.K,
            "seed": self.cfg.trainer.seed,
            "domains": self.domains,
            "method": self.cfg.distill.method,
        }

    def _restore(self, folder: Path) -> None:
        saved = json.loads((folder / "trainer_state.json").read_text())["trainer"].get(
            "geometry", {}
        )
        now = self._geometry()
        # The process count may change: each step draws the same global rows, only split
        # differently over ranks (and micro-batches), so it is the same run up to float order.
        changed = [k for k in now if k in saved and saved[k] != now[k] and k != "processes"]
        if changed:
            what = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed)
            raise DDKError(
                f"cannot resume '{self.run_dir}' with other settings ({what}); keep "
                "micro_batch_size x grad_accum_steps x processes, distill.K, trainer.seed, "
                "data.domains and distill.method as the run started (e.g. twice the processes: "
                "--set trainer.grad_accum_steps=<half>)"
            )
        states = sharded_states_dir(folder)
        saved_kind = states.name if states is not None else None
        if saved_kind != self.runtime.states_dirname:
            kind = {SHARDED: "FSDP2", DEEPSPEED: "DeepSpeed"}.get(saved_kind, "whole (DDP)")
            raise DDKError(
                f"checkpoint '{folder}' holds {kind} states but this launch uses "
                f"{self.runtime.backend}; resume with the accelerate config it ran with"
            )
        saved_world = saved.get("processes", self.world)
        if saved_kind == DEEPSPEED and saved_world != self.world:
            raise DDKError(
                f"checkpoint '{folder}' holds DeepSpeed ZeRO partitions of {saved_world} "
                f"processes; resume with {saved_world} processes (ZeRO partitions are not "
                "resharded; DDP and FSDP2 checkpoints are)"
            )
        loaded = load_checkpoint(
            folder, None if states is not None else self._unwrapped_student(), self.device
        )
        if states is not None:
            self.runtime.load_states(states, self.step_module, self.optimizer)
        else:
            self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["state"]["scheduler"])
        self._rebase_schedule()
        self.state = TrainState(**loaded["state"]["trainer"])
        self.state.geometry = now  # later checkpoints describe this launch
        try:
            self.sampler.load_state_dict(self.state.sampler)
        except ValueError as e:  # e.g. a checkpoint from before data fingerprints were stored
            raise DDKError(f"cannot resume '{self.run_dir}': {e}") from None
        self.plan = loaded["arrays"]["plan"]
        _set_rng_state(loaded["rng"])

    def _rebase_schedule(self) -> None:
        """A resume with --set trainer.lr / max_steps: the restored scheduler would keep the old
        peak (base_lrs) and the optimizer the old rate; recompute both as LambdaLR does."""
        lam = self.scheduler.lr_lambdas[0]
        self.scheduler.base_lrs = [self.cfg.trainer.lr for _ in self.scheduler.base_lrs]
        rates = [base * lam(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        self.scheduler._last_lr = rates

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path | None:
        """Run to trainer.max_steps; the final model's folder, or None when a signal stopped it."""
        cfg = self.cfg
        t, K = cfg.trainer, cfg.distill.K
        # Curves and Eq. 1/2 use val; the final numbers use the held-out test split.
        self.report_split = report_split(self.data, "test")
        teacher = self.teacher_perplexities_by_split(("val", self.report_split))
        self.teacher_ppl = teacher["val"] if teacher else None
        self.teacher_report_ppl = teacher[self.report_split] if teacher else None
        if self.plan is None:
            if not self.state.before:  # the student before training, on the report split
                before = self.evaluate_student_on(self.report_split)
                self.state.before = {d: before[d]["ppl"] for d in self.domains}
            self.update_domain_weights()  # r_0 (Eq. 1 for DDK)
        bar = tqdm(
            total=t.max_steps,
            initial=self.state.step,
            desc=f"distill [{cfg.distill.method}]",
            dynamic_ncols=True,
            unit="step",
            # `disable` only off rank 0: passing it always would override TQDM_DISABLE.
            **({} if self.is_main else {"disable": True}),
        )
        window_tokens, window_start = 0, time.perf_counter()
        try:
            with bar, _StopRequest() as stop:
                while self.state.step < t.max_steps:
                    interval = self.sampler.interval_of(self.state.step, K)
                    if interval != self.state.interval:
                        self.state.interval = interval
                        self.update_domain_weights()
                    logs = self.train_step(stop_requested=stop.signal_name is not None)
                    if logs["skipped"]:
                        self.metrics.write(
                            {
                                "event": "skipped_step",
                                "step": self.state.step,
                                "loss": logs["loss"],
                                "grad_norm": logs["grad_norm"],
                                "in_a_row": self.state.bad_steps_in_a_row,
                            }
                        )
                    if self.state.bad_steps_in_a_row > t.max_bad_steps:
                        raise DDKError(
                            f"{self.state.bad_steps_in_a_row} steps in a row had a NaN/inf loss or "
                            f"gradient (at step {self.state.step}); lower trainer.lr or check the "
                            f"data. {self._checkpoint_note()}"
                        )
                    window_tokens += self.step_tokens
                    bar.update(1)
                    if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                        elapsed = time.perf_counter() - window_start
                        record = {
                            "step": self.state.step,
                            "tokens": self.state.tokens_seen,
                            **{k: v for k, v in logs.items() if k != "stop"},
                            "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                            "bad_steps": self.state.bad_steps_total,
                        }
                        if self.device.type == "cuda":  # this rank's peak, for sizing runs
                            record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                        self.metrics.write(record)
                        bar.set_postfix(
                            loss=f"{logs['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                        )
                        window_tokens, window_start = 0, time.perf_counter()
                    if self.state.step % t.save_every == 0 and self.state.step < t.max_steps:
                        self.save()
                    # Every rank sees the same (all-reduced) flag, so all stop at the same step.
                    if logs["stop"] and self.state.step < t.max_steps:
                        path = self.save()
                        if self.is_main:
                            print(
                                f"{stop.signal_name or 'a stop signal'} received: saved {path} at "
                                f"step {self.state.step}. Resume with: ddk distill --resume {self.run_dir}"
                            )
                        return None
            return self.finish()
        finally:
            self.metrics.close()

    def _checkpoint_note(self) -> str:
        """What a user can resume from, stated only from what is on disk."""
        good = latest_good_checkpoint(self.run_dir, log=lambda _msg: None)
        if good is None:
            return "No checkpoint was written yet: the run must start again"
        return f"The last good checkpoint ({good.name}) is intact"

    def finish(self) -> Path:
        student = self.evaluate_student_on(self.report_split)
        weights = self.state.weights
        record = self._domain_event(FINAL_EVAL, student, self.teacher_report_ppl, weights)
        record["split"] = self.report_split
        for d in self.domains:
            record["domains"][d]["student_before_ppl"] = self.state.before.get(d)
        self.metrics.write(record)
        saved = self.save()
        final = self.run_dir / "final"
        # Sharded backends: gather one whole state dict (a collective) so final/ is always a
        # plain save_pretrained folder.
        full = None
        if self.runtime.is_sharded:
            prefix = "student."
            full = {
                k[len(prefix) :]: v
                for k, v in self.runtime.full_state_dict(self.step_module, saved).items()
                if k.startswith(prefix)
            }
        if self.is_main:
            model = self._unwrapped_student()
            if full is not None:
                model = plain_copy(model, full)
            model.config.use_cache = True  # generation wants the KV cache back
            save_final(self.run_dir, model, self.student_tokenizer)
            print(f"final student saved to {final}")
        self.runtime.barrier()
        return final


# An interval plan is 16 bytes per row; beyond this it would not fit in a host's memory.
MAX_PLAN_ROWS = 50_000_000


def check_plan_size(K: int, max_steps: int, sequences_per_step: int) -> None:
    rows = min(K, max_steps) * sequences_per_step
    if rows > MAX_PLAN_ROWS:
        raise DDKError(
            f"one interval would plan {rows:,} sequences (min(distill.K, trainer.max_steps) x "
            f"{sequences_per_step} per step), over the {MAX_PLAN_ROWS:,} limit; lower distill.K"
        )


def _is_rank0() -> bool:
    """Global rank 0 of a torchrun/Accelerate launch (the Runtime does not exist yet)."""
    import os

    return os.environ.get("RANK", "0") == "0"


LOCK_HINT = "run"


# What ddk writes in a run folder besides config.yaml; the lock file comes first, before any
# check or model load, so even a run that died at once has it.
_RUN_MARKERS = ("checkpoints", "metrics.jsonl", "teacher_ppl.json")


def _has_run_marker(run_dir: Path) -> bool:
    from ddk.lock import LOCK_NAME

    return any((run_dir / name).exists() for name in (*_RUN_MARKERS, LOCK_NAME))


def run_lock(run_dir: Path):
    """One process per run folder, held from before preflight to the run's end. Only global
    rank 0 takes it: ranks on one node would otherwise lock each other out."""
    from ddk.lock import FolderLock

    if not _is_rank0():
        return contextlib.nullcontext()
    return FolderLock(run_dir, LOCK_HINT)


def start_run(cfg: Config) -> Path | None:
    """A new run in cfg.trainer.output_dir; refuses a folder that already holds a run."""
    from ddk.lock import LOCK_NAME, raise_if_held

    run_dir = Path(cfg.trainer.output_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise DDKError(f"trainer.output_dir '{run_dir}' is a file; choose a folder")
    created = not run_dir.exists()

    def refuse_non_empty() -> None:
        if not created and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            raise_if_held(run_dir, LOCK_HINT)  # a live run there: name its PID
            if not _has_run_marker(run_dir):  # the user's own folder: --resume would not help
                first = sorted(p.name for p in run_dir.iterdir())[0]
                raise DDKError(
                    f"run folder '{run_dir}' is not empty and holds no ddk run ({first}, ...); "
                    "set trainer.output_dir to a new or empty folder"
                )
            raise DDKError(
                f"run folder '{run_dir}' is not empty; resume it with `ddk distill --resume "
                f"{run_dir}` or set trainer.output_dir to a new folder"
            )

    refuse_non_empty()  # before locking: a refused folder is left exactly as it was
    with run_lock(run_dir):
        refuse_non_empty()  # a run may have started in between
        try:
            trainer = Trainer(cfg, run_dir)
        except BaseException:
            # Refused before anything was written: leave no folder holding only the lock
            # (rank 0 holds it and cleans up; the other ranks must not race it).
            if created and _is_rank0() and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                (run_dir / LOCK_NAME).unlink()
                run_dir.rmdir()
            raise
        if trainer.is_main:
            cfg.save(run_dir / "config.yaml")
        return trainer.train()


def resume_run(run_dir: str | Path, overrides: list[str] | None = None) -> Path | None:
    """Continue from the newest intact checkpoint; a run that died before its first checkpoint
    starts again from step 0 with its saved config. The run folder's config.yaml must agree
    with what the checkpoint recorded (see ddk.resume)."""
    from ddk.lock import LOCK_NAME
    from ddk.resume import check_overrides, check_resume

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise DDKError(f"'{run_dir}' holds no run (no config.yaml) to resume")
    if not _has_run_marker(run_dir):
        # A folder with only someone's config.yaml: resuming would train into it and rewrite
        # that file. Checked before the lock, so a refused folder gains no lock file.
        raise DDKError(
            f"'{run_dir}' holds a config.yaml but no run that ddk started (no checkpoints/, "
            f"metrics.jsonl or {LOCK_NAME}); start a new run in a new folder instead"
        )
    with run_lock(run_dir):
        override_keys = check_overrides(overrides or [])
        cfg = load_config(run_dir / "config.yaml", overrides)
        checkpoint = agreed_latest_good_checkpoint(run_dir)
        if checkpoint is None and list_checkpoints(run_dir):
            raise DDKError(f"'{run_dir}' has no intact checkpoint to resume from; start a new run")
        for warning in check_resume(run_dir, cfg, override_keys, checkpoint):
            if _is_rank0():
                print(warning)
        if _is_rank0():
            print(
                f"resuming from {checkpoint}"
                if checkpoint
                else f"no checkpoint yet: restarting {run_dir}"
            )
        trainer = Trainer(cfg, run_dir, resume_from=checkpoint)
        if trainer.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
            cfg.save(run_dir / "config.yaml")
        return trainer.train()
