"""`distill.cross_mismatch: merge`: the sorted-probability distance between the two models'
MERGED probabilities of a whole byte span, as TRL's GOLD trainer does (`ULDLoss` with
`use_extended_uld`, its chain-rule `uld_token_merge_strategy: "bayesian"`).

Where an aligned student/teacher pair's next tokens cover different bytes, both sides go on
predicting the same stretch of text up to the next boundary both share (the next aligned pair,
or the window's end): student tokens s_1..s_m, predicted at rows i..i+m-1, and teacher tokens
t_1..t_n, at positions k..k+n-1 (`ddk.teacher.alignment.mismatch_spans`). With
q_r = softmax(z_S[r] / τ) and p_k = softmax(z_T[k] / τ), each side's span distribution is the
chain rule along the actual text, the probability of the span's earlier tokens times the
distribution at its last position:

    A = Σ_{j<m} log q_{i+j-1}(s_j),    q̃ = e^A · q_{i+m-1}      (over V_S)
    B = Σ_{j<n} log p_{k+j-1}(t_j),    p̃ = e^B · p_{k+n-1}      (over V_T)

    MERGE = Σ_r | sort↓(p̃)_r − sort↓(q̃)_r |,   r = 1 .. max(V_S, V_T), zero-padded

(q̃_v is the probability of "the span's earlier tokens, then v"; neither vector sums to 1).
The loss sits on the student's last row i+m-1; its gradient reaches the earlier rows through
A. A span with one token on a side has no prefix there (A = 0). GOLD's default "observed"
strategy multiplies the first position's distribution by the later tokens' probabilities read
one position off (its own docs: only "bayesian" makes probs[k] predict token_ids[k]); this is
the "bayesian" one. GOLD also sums over the exact spans; here those keep the exact KL over the
shared strings (`ddk.losses.crosstok`), as its hybrid mode does. (Read in huggingface/trl at
f2cd577, trl/experimental/gold/gold_trainer.py: `ULDLoss._align_by_byte_offsets`,
`_merge_probabilities_with_alignment_groups`, `_compute_distillation_loss`; gold_config.py.)

Because the merged vectors are not normalised, when every sorted entry of e^A q lies below the
teacher's (a student far less sure of the span's start than the teacher), MERGE = e^B − e^A and
its gradient moves only A, the student's probability of the span's earlier tokens.

Chunked like the rest (no [tokens, vocab] tensor): a no-grad pre-pass (`with_merge_terms`)
computes, per span, A and B from the label log-probs of its earlier rows, and dMERGE/dA at its
last row; each chunk then needs only its own rows: MERGE at last rows (A held constant) plus
w · (c_r − sg(c_r)) at earlier rows (c_r = log q_r(s), w = dMERGE/dA of its span), which is 0
in value and carries exactly the chain rule's gradient through A.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ddk.teacher.signals import CrossSignal, MergeTerms, log_probs

MERGED = 3  # a CrossSignal mode: the last student row of a merged span


def merged_uld(
    student_logits: Tensor, teacher_logits: Tensor, student_prefix: Tensor,
    teacher_prefix: Tensor, tau: float,
) -> Tensor:  # fmt: skip
    """[n] Σ_r |sort↓(e^B p)_r − sort↓(e^A q)_r| over max(V_S, V_T) entries (zero-padded)."""
    q = (log_probs(student_logits, tau) + student_prefix[:, None]).exp()
    q = q.sort(dim=-1, descending=True).values
    with torch.no_grad():
        p = (log_probs(teacher_logits, tau) + teacher_prefix[:, None].to(q.dtype)).exp()
        p = p.sort(dim=-1, descending=True).values.to(q.dtype)
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def merge_divergence(student_logits: Tensor, teacher_logits: Tensor, teacher: CrossSignal,
                     tau: float) -> Tensor:  # fmt: skip
    """Per-row merged-span loss of one chunk whose `teacher.merge_terms` are filled (module doc):
    MERGE at span-last rows, a zero-valued gradient carrier at their earlier rows."""
    terms = teacher.merge_terms
    if terms is None:
        raise ValueError("cross_mismatch 'merge': the signal's merge_terms are not computed")
    out = student_logits.new_zeros(student_logits.shape[0])
    last = (teacher.mode.to(out.device) == MERGED).nonzero().squeeze(1)
    if last.numel():
        d = merged_uld(student_logits.index_select(0, last), teacher_logits.index_select(0, last),
                       terms.student_prefix.index_select(0, last),
                       terms.teacher_prefix.index_select(0, last), tau)  # fmt: skip
        out = out.index_put((last,), d.to(out.dtype))
    earlier = (terms.weight != 0).nonzero().squeeze(1)
    if earlier.numel():
        c = log_probs(student_logits.index_select(0, earlier), tau)
        c = c.gather(1, terms.label.index_select(0, earlier)[:, None]).squeeze(1)
        carrier = terms.weight.index_select(0, earlier).to(c.dtype) * (c - c.detach())
        out = out.index_put((earlier,), carrier.to(out.dtype))
    return out


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, transform, vocab: int) -> Tensor:
    bias = None if bias is None else bias[:vocab]
    z = F.linear(hidden, weight[:vocab], bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if transform is None else transform(z)


def label_log_probs(hidden: Tensor, head: tuple, ids: Tensor, tau: float, chunk: int) -> Tensor:
    """[n] log softmax(z / τ)[ids] of rows `hidden` under `head` = (weight, bias, transform,
    vocab), `chunk` rows at a time."""
    out = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden.shape[0], chunk):
        z = _logits(hidden[start : start + chunk], *head)
        out.append(log_probs(z, tau).gather(1, ids[start : start + chunk, None]).squeeze(1))
    return torch.cat([o.to(out[-1].dtype) for o in out])


def _span_rows(teacher: CrossSignal, labels: Tensor, ignore_index: int):
    """(mode, span-last row per row, earlier rows, last rows) of the spans whose targets are
    all real: a span with an ignored target (a chat mask) is incomplete and gets no loss."""
    n, device = labels.shape[0], labels.device
    row = teacher.merge.student_row.to(device)
    inside = row >= 0
    broken = torch.zeros(n, dtype=torch.bool, device=device)
    broken[row[inside & (labels == ignore_index)]] = True
    mode = teacher.mode.to(device).masked_fill(broken, 0)
    ok = inside & ~broken[row.clamp(min=0)]
    earlier = (ok & (row != torch.arange(n, device=device))).nonzero().squeeze(1)
    last = (mode == MERGED).nonzero().squeeze(1)
    return mode, row, earlier, last


def prepare_signal(teacher, mismatch: str, student_hidden: Tensor, student_head: tuple,
                   labels: Tensor, tau: float, chunk: int, ignore_index: int):  # fmt: skip
    """The chunked loss's teacher signal: a cross-tokenizer one with its merge terms filled when
    `mismatch` is "merge" (`with_merge_terms`), any other unchanged."""
    if not isinstance(teacher, CrossSignal) or mismatch != "merge":
        return teacher
    return with_merge_terms(teacher, student_hidden, student_head, labels, tau, chunk, ignore_index)


@torch.no_grad()
def with_merge_terms(teacher: CrossSignal, student_hidden: Tensor, student_head: tuple,
                     labels: Tensor, tau: float, chunk: int, ignore_index: int) -> CrossSignal:  # fmt: skip
    """The signal with `merge_terms` filled (module doc): A and B at each span's last row,
    dMERGE/dA at its earlier rows. `student_head` = (weight, bias, transform, vocab)."""
    if teacher.merge is None:
        raise ValueError("cross_mismatch 'merge' needs a signal built with its merge spans")
    mode, row, earlier, last = _span_rows(teacher, labels, ignore_index)
    n, device = labels.shape[0], labels.device
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    t_head = (teacher.head_weight, teacher.head_bias, teacher.transform, teacher.teacher_vocab)
    c = label_log_probs(student_hidden.index_select(0, earlier).detach(), student_head,
                        labels.index_select(0, earlier), tau, chunk)  # fmt: skip
    a = torch.zeros(n, dtype=dtype, device=device).index_add_(0, row[earlier], c.to(dtype))
    g = teacher.merge
    t_lp = label_log_probs(g.teacher_hidden, t_head, g.teacher_ids.to(device), tau, chunk)
    b = torch.zeros(n, dtype=dtype, device=device)
    b.index_add_(0, g.teacher_row.to(device), t_lp.to(dtype))
    d_a = torch.zeros(n, dtype=dtype, device=device)
    for start in range(0, last.numel(), chunk):
        idx = last[start : start + chunk]
        z_s = _logits(student_hidden.index_select(0, idx).detach(), *student_head)
        z_t = _logits(teacher.hidden.index_select(0, idx), *t_head)
        leaf = a.index_select(0, idx).requires_grad_(True)
        with torch.enable_grad():
            loss = merged_uld(z_s, z_t, leaf, b.index_select(0, idx), tau).sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        d_a[idx] = grad
    weight = torch.zeros(n, dtype=dtype, device=device)
    weight[earlier] = d_a[row[earlier]]
    terms = MergeTerms(a, b, weight, labels.clamp(min=0))
    return teacher._replace(mode=mode, merge_terms=terms)


def naive_merge_divergence(student_logits: Tensor, teacher: CrossSignal, labels: Tensor,
                           tau: float, ignore_index: int) -> Tensor:  # fmt: skip
    """[N] MERGE at each span's last row from FULL logits with ordinary autograd, one span at a
    time: the reference the chunked path is tested against."""
    g = teacher.merge
    vocab = teacher.teacher_vocab
    t_head = (teacher.head_weight, teacher.head_bias, teacher.transform, vocab)
    log_q = log_probs(student_logits, tau)
    t_lp = log_probs(_logits(g.teacher_hidden, *t_head), tau)
    t_lp = t_lp.gather(1, g.teacher_ids[:, None]).squeeze(1)
    out = student_logits.new_zeros(student_logits.shape[0])
    for last in (teacher.mode == MERGED).nonzero().squeeze(1).tolist():
        members = (g.student_row == last).nonzero().squeeze(1)
        if (labels[members] == ignore_index).any():
            continue
        earlier = members[members != last]
        a = log_q[earlier, labels[earlier]].sum().reshape(1)
        b = t_lp[g.teacher_row == last].sum().reshape(1)
        z_t = _logits(teacher.hidden[last : last + 1], *t_head)
        d = merged_uld(student_logits[last : last + 1], z_t, a, b, tau)
        out = out + F.one_hot(torch.tensor(last), out.shape[0]).to(out.dtype) * d
    return out
