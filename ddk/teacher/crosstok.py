"""A live teacher with another tokenizer (`teacher.tokenizer: cross`).

Each training row is the student's window i of a domain; the teacher reads the same text,
re-tokenised by its own tokenizer (`ddk.teacher.retokenize`, from the byte spans `ddk prepare`
stored), and its hidden states are gathered to the student positions that have seen the same
text (`ddk.teacher.alignment`). The loss compares the two distributions there
(`ddk.losses.crosstok`).

DDK's ratio compares total NLL over the same bytes. The teacher scores each held-out window's
targets (all its text after the student's first token, plus the EOS if the window holds
it) with its own tokens, cut at the end of the student's first token so both score exactly the
same bytes. Its perplexity is reported two ways:

    ppl_byte = exp(NLL_T / bytes)             comparable across tokenizers
    ppl      = exp(NLL_T / N_S)               in student-token units (N_S: student targets)

and DDK divides the student's ppl = exp(NLL_S / N_S) by the latter, so

    ratio = exp((NLL_S - NLL_T) / N_S) = (ppl_byte_S / ppl_byte_T) ^ (bytes / N_S),

the ratio of per-byte perplexities in student-token units: with one tokenizer it is exactly
today's ratio (NLL_T is then the same number), and across tokenizers it compares the same
quantity (the NLL of the same text).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from ddk.logits import hidden_and_head, logit_transform
from ddk.losses import chunked_ce_sum
from ddk.models import check_vocab, embedding_rows, load_tokenizer
from ddk.teacher.alignment import Tokens, align, mismatch_spans
from ddk.teacher.placement import load_configured_teacher
from ddk.teacher.retokenize import Retokenizer, shared_vocabulary
from ddk.teacher.signals import Batch, CrossSignal, MergeGroups

IGNORE = -100


class CrossTokenizerTeacher:
    """A `TeacherSource` over a live model whose tokenizer differs from the student's."""

    def __init__(self, model, tokenizer, student_tokenizer, data, *, autocast=None, chunk=1024,
                 mismatch: str = "uld", domains=None):  # fmt: skip
        """`domains`: the domains whose perplexities it scores (default: all of the data's;
        a teacher per domain scores its own only)."""
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self.mismatch = mismatch  # "merge": the signal carries the mismatched spans
        self.autocast = autocast or contextlib.nullcontext
        self.chunk = chunk
        self.names = data.names  # what Batch.rows's domain index counts in
        self.scored = list(domains) if domains is not None else list(data.names)
        self.retok = Retokenizer(
            tokenizer, data.manifest.tokenizer.bos_token_id, data.manifest.tokenizer.eos_token_id
        )
        s_ids, t_ids = shared_vocabulary(student_tokenizer, tokenizer)
        self.vocab = tokenizer_vocab(tokenizer)
        self.device = model.get_output_embeddings().weight.device
        self.student_shared = torch.as_tensor(s_ids, device=self.device)
        self.teacher_shared = torch.as_tensor(t_ids, device=self.device)
        self.transform = logit_transform(model)
        self._ppl: dict[str, dict] = {}

    def _window(self, split: str, domain: str, index: int):
        """(student ids, student tokens, text) of window `index` of `split`."""
        shard = self.data.domains[domain]
        start, n = shard.window_start(split, index)
        text, ends = shard.byte_spans(split).window(start, n)
        ids = np.asarray(shard._tokens(split)[start : start + n], dtype=np.int64)
        return ids, self.retok.student_tokens(ids, ends), text

    def _aligned_rows(self, batch: Batch):
        """Per row: teacher ids and the alignment with the student's window."""
        out = []
        for d, j in np.asarray(batch.rows).tolist():
            ids, s_tokens, text = self._window("train", self.names[d], j)
            t_ids, t_tokens = self.retok.window(text, s_tokens)
            a = align(s_tokens, t_tokens)
            spans = mismatch_spans(a, s_tokens, t_tokens) if self.mismatch == "merge" else None
            out.append((t_ids, a, spans))
        return out

    @torch.no_grad()
    def signal(self, batch: Batch) -> CrossSignal:
        B, L = batch.input_ids.shape
        rows = self._aligned_rows(batch)
        hidden = self._hidden([t_ids[:-1] for t_ids, _, _ in rows])  # [B, m, H_t]
        gathered = hidden.new_zeros(B * L, hidden.shape[-1])
        mode = torch.zeros(B * L, dtype=torch.int8, device=hidden.device)
        for r, (_, a, _) in enumerate(rows):
            dst = torch.as_tensor(r * L + a.student_pos, device=hidden.device)
            gathered[dst] = hidden[r, torch.as_tensor(a.teacher_pos, device=hidden.device)]
            mode[dst] = torch.as_tensor(np.where(a.exact, 1, 2), dtype=torch.int8,
                                        device=hidden.device)  # fmt: skip
        merge = None
        if self.mismatch == "merge":
            merge = merge_groups(rows, hidden, gathered, mode, L)
        head = self.model.get_output_embeddings()
        return CrossSignal(
            gathered, head.weight, mode, self.student_shared, self.teacher_shared, self.vocab,
            getattr(head, "bias", None), self.transform, merge,
        )  # fmt: skip

    def _hidden(self, sequences: list[np.ndarray]) -> torch.Tensor:
        """The teacher's last hidden states of right-padded `sequences` (padding comes after
        every real token: a causal model's states of the real ones never see it)."""
        width = max(1, max(len(s) for s in sequences))
        ids = torch.full((len(sequences), width), self.retok.eos, dtype=torch.long)
        for r, s in enumerate(sequences):
            ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        with self.autocast():
            hidden, _ = hidden_and_head(self.model, ids.to(self.device))
        return hidden

    # ------------------------------------------------------------------ perplexities
    def scored_window(self, split: str, domain: str, index: int):
        """(teacher ids, labels, student targets, target bytes) of a held-out window: the
        teacher reads the student's first token, then scores the rest of the window."""
        ids, s, text = self._window(split, domain, index)
        first = int(s.ends[0])
        head_ids, _ = self.retok.window(text[:first], Tokens(s.ends[:1], s.kinds[:1]))
        if len(head_ids) == 0:  # no text before the targets: start from BOS
            head_ids = np.asarray([self.retok.bos], dtype=np.int64)
        rest = Tokens(s.ends[1:] - first, s.kinds[1:])
        tail_ids, _ = self.retok.window(text[first:], rest)
        seq = np.concatenate([head_ids, tail_ids])
        labels = np.full(len(seq) - 1, IGNORE, dtype=np.int64)
        labels[len(head_ids) - 1 :] = tail_ids
        return seq[:-1], labels, len(ids) - 1, int(s.ends[-1]) - first

    @torch.no_grad()
    def domain_nll(self, split: str, domain: str, batch_size: int = 8) -> dict:
        shard = self.data.domains[domain]
        nll, student_targets, nbytes = 0.0, 0, 0
        windows = [self.scored_window(split, domain, w) for w in range(shard.num_sequences(split))]
        for b in range(0, len(windows), batch_size):
            part = windows[b : b + batch_size]
            hidden = self._hidden([w[0] for w in part])
            labels = torch.full(hidden.shape[:2], IGNORE, dtype=torch.long)
            for r, w in enumerate(part):
                labels[r, : len(w[1])] = torch.as_tensor(w[1])
            head = self.model.get_output_embeddings()
            loss, _ = chunked_ce_sum(
                hidden.reshape(-1, hidden.shape[-1]), head.weight,
                labels.reshape(-1).to(hidden.device), vocab_size=self.vocab,
                chunk_tokens=self.chunk, head_bias=getattr(head, "bias", None),
                transform=self.transform,
            )  # fmt: skip
            nll += float(loss)
            student_targets += sum(w[2] for w in part)
            nbytes += sum(w[3] for w in part)
        return per_byte_result(nll, student_targets, nbytes)

    def perplexities(self, split: str) -> dict[str, float]:
        if split not in self._ppl:
            self._ppl[split] = {d: self.domain_nll(split, d) for d in self.scored}
        return {d: r["ppl"] for d, r in self._ppl[split].items()}

    def details(self, split: str) -> dict[str, dict]:
        self.perplexities(split)
        return self._ppl[split]

    @property
    def ppl_key(self) -> dict:
        return {"teacher_tokenizer": self.tokenizer.name_or_path, "cross_tokenizer": True}

    @property
    def ppl_source(self) -> dict[str, str]:
        return {split: "computed" for split in self._ppl}


def merge_groups(rows, hidden, gathered, mode, L: int) -> MergeGroups:
    """`cross_mismatch: merge`: move each mismatched pair's loss to its span's last student row
    (mode 3, the teacher's last position of the span gathered there), and collect the rows
    before it on both sides (`MergeGroups`); `gathered` and `mode` are updated in place."""
    device = hidden.device
    student_row = torch.full((mode.shape[0],), -1, dtype=torch.long, device=device)
    t_rows, t_pos, t_ids_next, t_loss_row = [], [], [], []
    mode[mode == 2] = 0
    for r, (t_ids, _, spans) in enumerate(rows):
        for s_start, s_stop, t_start, t_stop in spans.tolist():
            loss_row = r * L + s_stop - 1
            student_row[r * L + s_start : loss_row + 1] = loss_row
            mode[loss_row] = 3
            gathered[loss_row] = hidden[r, t_stop - 1]
            t_rows += [r] * (t_stop - 1 - t_start)
            t_pos += range(t_start, t_stop - 1)
            t_ids_next += t_ids[t_start + 1 : t_stop].tolist()
            t_loss_row += [loss_row] * (t_stop - 1 - t_start)
    as_long = functools.partial(torch.as_tensor, dtype=torch.long, device=device)
    prefix_hidden = hidden[as_long(t_rows), as_long(t_pos)].reshape(-1, hidden.shape[-1])
    return MergeGroups(student_row, prefix_hidden, as_long(t_ids_next), as_long(t_loss_row))


def tokenizer_vocab(tokenizer) -> int:
    """The teacher's vocabulary size: every id its tokenizer can give (specials included)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def cross_tokenizers(cfg, name: str | None = None) -> tuple:
    """(teacher tokenizer, student tokenizer) of a `teacher.tokenizer: cross` config; `name`:
    one teacher of `model.teachers` (default model.teacher)."""
    trust = cfg.model.trust_remote_code
    teacher = load_tokenizer(name or cfg.model.teacher, trust)
    return teacher, load_tokenizer(cfg.model.student, trust)


def load_cross_teacher(cfg, data, runtime, name=None, domains=None) -> CrossTokenizerTeacher:
    """model.teacher (or `name`, one teacher of model.teachers, scoring `domains`), placed as
    `teacher.placement` asks, with its own tokenizer."""
    model = load_configured_teacher(cfg, runtime, name)
    tokenizer, student_tokenizer = cross_tokenizers(cfg, name)
    check_vocab(len(tokenizer), embedding_rows(model), embedding_rows(model))
    return CrossTokenizerTeacher(
        model, tokenizer, student_tokenizer, data, autocast=runtime.autocast,
        chunk=cfg.distill.loss_chunk_tokens, mismatch=cfg.distill.cross_mismatch,
        domains=domains,
    )  # fmt: skip


def per_byte_result(nll: float, student_targets: int, nbytes: int) -> dict:
    """{"ppl" (student-token units), "ppl_byte", "loss", "tokens", "bytes"} of a total NLL."""
    loss = nll / max(student_targets, 1)
    return {
        "ppl": math.exp(min(loss, 700.0)),
        "ppl_byte": math.exp(min(nll / max(nbytes, 1), 700.0)),
        "loss": loss,
        "tokens": student_targets,
        "bytes": nbytes,
    }
