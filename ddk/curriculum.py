"""The interval plan: which training sequences each step of a distillation interval reads
(DDK's Algorithm 1, steps 1-2, for every method).

Every K steps the trainer evaluates the student and calls `begin_interval` with the student's
and the teacher's per-domain perplexities; the plan turns them into the interval's domain
weights (Eq. 1 / Eq. 2, or the method's fixed mixture: `ddk.domains.next_weights`) and draws
the interval's rows, ``(domain index, sequence index)``, in proportion to them
(`ddk.sampler.DomainSampler`). Each step then reads its global batch of rows, and each rank its
slice (`rows`). The plan is a deterministic function of the seed and the perplexities, so every
rank computes the same one; `state_dict` is what a checkpoint needs to continue it exactly.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ddk.config import Config
from ddk.data.dataset import PreparedData
from ddk.domains import fixed_mixture, next_weights
from ddk.errors import ConfigError, DDKError
from ddk.methods import method_spec
from ddk.ranks import print0
from ddk.sampler import DomainSampler

# An interval plan is 16 bytes per row; beyond this it would not fit in a host's memory.
MAX_PLAN_ROWS = 50_000_000
# What a saved plan assumes of the launch; "processes" may change (each step draws the same
# global rows, only split otherwise over ranks and micro-batches).
RESUMABLE_GEOMETRY = ("processes",)


def check_plan_size(K: int, max_steps: int, sequences_per_step: int) -> None:
    rows = min(K, max_steps) * sequences_per_step
    if rows > MAX_PLAN_ROWS:
        raise DDKError(
            f"one interval would plan {rows:,} sequences (min(distill.K, trainer.max_steps) x "
            f"{sequences_per_step} per step), over the {MAX_PLAN_ROWS:,} limit; lower distill.K"
        )


class IntervalPlan:
    """K, the global batch, the sampler, the drawn rows and the current domain weights."""

    def __init__(self, cfg: Config, data: PreparedData, world_size: int):
        d, t = cfg.distill, cfg.trainer
        self.method = method_spec(d.method)
        self.domains = data.names
        self.K, self.max_steps = d.K, t.max_steps
        self.alpha, self.steering, self.max_epochs = d.alpha, d.steering(), d.max_domain_epochs
        if self.steering.needs_prior:  # the natural mix of training tokens
            tokens = data.train_tokens()
            self.steering = replace(self.steering, prior=tuple(tokens[n] for n in self.domains))
        self.micro, self.accum, self.world = t.micro_batch_size, t.grad_accum_steps, world_size
        self.global_batch = self.micro * self.accum * world_size
        self.fixed = None
        if self.method.fixed_mixture:
            try:
                self.fixed = fixed_mixture(self.domains, d.mixture, data.train_tokens())
            except ValueError as e:
                raise ConfigError(f"distill.mixture: {e}") from None
        self.sampler = DomainSampler(
            {n: s.num_train_sequences for n, s in data.domains.items()}, t.seed
        )
        check_plan_size(self.K, self.max_steps, self.global_batch)
        if self.K > self.max_steps and self.method.teacher_for_weights:
            print0(
                f"warning: distill.K {self.K} > trainer.max_steps {self.max_steps}: the domain "
                "weights are set once and never updated; lower distill.K"
            )
        self._warn_steering()
        self.geometry = {
            "sequences_per_step": self.global_batch,
            "processes": world_size,
            "K": self.K,
            "seed": t.seed,
            "domains": self.domains,
            "method": d.method,
        }
        self.interval = 0
        self.weights: list[float] = []
        # the student's val perplexities at the last update (distill.gap_trend reads them)
        self.last_val_ppl: list[float] = []
        self.plan: np.ndarray | None = None  # the current interval's rows, [steps * batch, 2]
        self._epoch_warned: set[str] = set()

    # ------------------------------------------------------------------ the interface
    @property
    def started(self) -> bool:
        """Whether an interval has been drawn (a fresh run has none)."""
        return self.plan is not None

    def due(self, step: int) -> bool:
        """Whether `step` starts an interval that has not been drawn yet."""
        return self.plan is None or step // self.K != self.interval

    def begin_interval(self, student_ppl: dict[str, float], teacher_ppl: dict | None):
        """The next interval's weights r_t from the perplexities (Eq. 1 at interval 0, Eq. 2
        after, for DDK), and its rows drawn; returns r_t."""
        interval = 0 if self.plan is None else self.interval + 1
        step = interval * self.K
        if not self.method.teacher_for_weights:
            self._warn_bad_evaluation(student_ppl, step)
        try:
            weights = next_weights(
                self.method.name,
                interval,
                self.weights or None,
                [student_ppl[d] for d in self.domains],
                [teacher_ppl[d] for d in self.domains] if teacher_ppl else None,
                self.alpha,
                self.fixed,
                domains=self.domains,
                steering=self.steering,
                previous_student_ppl=self.last_val_ppl or None,
            )
        except ValueError as e:
            raise DDKError(f"cannot update domain weights at step {step}: {e}") from None
        self.interval = interval
        self.weights = [float(w) for w in weights]
        if self.method.teacher_for_weights:  # the baselines' perplexities may be NaN
            self.last_val_ppl = [float(student_ppl[d]) for d in self.domains]
        self.plan = self.sampler.plan_interval(
            interval, weights, self._interval_steps() * self.global_batch
        )
        self._warn_starved_or_repeated()
        return weights

    def rows(self, step: int, rank: int) -> np.ndarray:
        """This rank's rows of `step`: [grad_accum_steps, micro_batch_size, 2]."""
        if len(self.plan) < (step % self.K + 1) * self.global_batch:
            self._extend()
        offset = (step % self.K) * self.global_batch
        rows = self.plan[offset : offset + self.global_batch]
        return rows.reshape(self.accum, self.world, self.micro, 2)[:, rank]

    def rows_per_domain(self) -> list[int]:
        """Sequences the current interval gives each domain."""
        return np.bincount(self.plan[:, 0], minlength=len(self.domains)).tolist()

    def epochs(self) -> list[int]:
        """Passes through each domain's training data handed out so far."""
        return [self.sampler.epochs_completed(d) for d in self.domains]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "interval": self.interval,
            "weights": list(self.weights),
            "last_val_ppl": list(self.last_val_ppl),
            "sampler": self.sampler.state_dict(),
            "geometry": self.geometry,
            "plan": self.plan,
        }

    def check_state_dict(self, state: dict) -> None:
        """Refuse (ValueError) a saved plan this launch cannot continue, before anything loads."""
        saved = state.get("geometry", {})
        changed = [
            k
            for k in self.geometry
            if k in saved and saved[k] != self.geometry[k] and k not in RESUMABLE_GEOMETRY
        ]
        if changed:
            what = ", ".join(f"{k} {saved[k]} -> {self.geometry[k]}" for k in changed)
            raise ValueError(
                f"the run started with other settings ({what}); keep micro_batch_size x "
                "grad_accum_steps x processes, distill.K, trainer.seed, data.domains and "
                "distill.method as the run started (e.g. twice the processes: --set "
                "trainer.grad_accum_steps=<half>)"
            )

    def load_state_dict(self, state: dict) -> None:
        # ValueError for another data's positions (or a checkpoint from before they were saved)
        self.sampler.load_state_dict(state.get("sampler", {}))
        self.interval = int(state.get("interval", 0))
        self.weights = [float(w) for w in state.get("weights", [])]
        self.last_val_ppl = [float(p) for p in state.get("last_val_ppl", [])]
        self.plan = state["plan"]

    # ------------------------------------------------------------------ internals
    def _interval_steps(self) -> int:
        """Steps of the current interval that will run: the last one may end at max_steps."""
        return max(1, min(self.K, self.max_steps - self.interval * self.K))

    def _extend(self) -> None:
        """A resume with a larger trainer.max_steps needs more of the current interval's rows."""
        more = self._interval_steps() - len(self.plan) // self.global_batch
        if more > 0:
            extra = self.sampler.plan_interval(
                self.interval, self.weights, more * self.global_batch
            )
            self.plan = np.concatenate([self.plan, extra])

    @property
    def _floor_hint(self) -> str:
        if self.steering.focus == "worst":
            return "distill.min_share or distill.gap: log_ratio keeps every domain sampled"
        return "Eq. 1 has no floor, distill.init_floor=true adds one"

    def _warn_bad_evaluation(self, student_ppl: dict[str, float], step: int) -> None:
        """Baselines do not steer by perplexity: a NaN/inf one is logged, not fatal."""
        bad = [d for d in self.domains if not math.isfinite(student_ppl[d])]
        if bad:
            print0(
                f"warning: student perplexity is NaN/inf on {', '.join(bad)} at step {step}; "
                f"{self.method.name} does not use it, logged as NaN"
            )

    def _warn_steering(self) -> None:
        """Steering keys that turn DDK into something the user did not ask for."""
        if not self.method.teacher_for_weights:
            return
        steering = self.steering
        intervals = -(-self.max_steps // self.K)
        if steering.uniform_intervals >= intervals:
            print0(
                f"warning: distill.uniform_intervals {steering.uniform_intervals} covers all "
                f"{intervals} intervals: this run samples uniformly (equal sampling); lower it"
            )
        if steering.focus == "worst" and steering.gap == "ratio":
            print0(
                "warning: distill.focus: worst on raw ratios (distill.gap: ratio): a ratio far "
                "above the others gives that domain every sample; use distill.gap: log_ratio"
            )

    def _warn_starved_or_repeated(self) -> None:
        """One warning per starved domain (Eq. 1 has no floor) and per domain past max
        epochs."""
        n = len(self.plan)  # the rows just drawn (only the steps that will run)
        # a fixed mixture never changes: its zero rows are said once, at interval 0
        repeat = self.method.teacher_for_weights or self.interval == 0
        for d, rows, epochs, w in zip(
            self.domains, self.rows_per_domain(), self.epochs(), self.weights
        ):
            if rows == 0 and repeat:
                print0(
                    f"warning: domain '{d}' gets 0 of {n} sequences in interval {self.interval} "
                    f"(weight {w:.2g}; {self._floor_hint})"
                )
            if epochs > self.max_epochs and d not in self._epoch_warned:
                self._epoch_warned.add(d)
                print0(
                    f"warning: domain '{d}' has been repeated for {epochs} epochs (more than "
                    f"distill.max_domain_epochs={self.max_epochs}); add data to it or expect "
                    "memorisation"
                )
