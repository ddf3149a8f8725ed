"""`ddk cache-teacher`: the teacher's next-token distribution over every training token, as a
top-k head plus sampled tail tokens, stored once, so `teacher.mode: offline` distils with no
teacher loaded.

Layout of the cache folder (``teacher.cache``)::

    manifest.json                 what was cached and by which teacher (see ``_identity``)
    <domain folder>/000000.bin    one shard: up to SHARD_SEQUENCES training sequences

A shard holds, for its n sequences of L = seq_len positions (position t predicts token t+1),
C-order arrays back to back (``_layout``): ids [n, L, k] (uint16, or uint32 past 65,536
tokens), log-probs at temperature tau [n, L, k] (float16) and the log tail mass [n, L]
(float32); with s = ``samples`` > 0 (``teacher.sparse_estimator: sampled``) then s tail ids
drawn from the teacher [n, L, s], their log-probs [n, L, s] and the tail proposal's log
normaliser [n, L] (float32; ``ddk.losses.sparse``): (k + s)·(2 + id bytes) + 4 (+ 4 with
samples) bytes per token. The draws' uniforms are a hash of (data fingerprint, domain,
sequence, position). Format 1 (before samples) is format 2 with s = 0: the top-k estimator
still reads it. Each shard is written to a temporary file and renamed,
so a shard either exists whole or not at all: an interrupted run resumes with the missing
shards, and the result is byte for byte what an uninterrupted run writes (each shard's
batches are the same either way). Under `accelerate launch`, rank r writes shards r::world.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddk.errors import DDKError
from ddk.lock import LOCK_NAME
from ddk.logits import logit_transform
from ddk.losses.sparse import (
    PROPOSAL_POWER,
    counter_uniforms,
    sample_log_weights,
    sampled_from_logits,
    sparse_from_logits,
)
from ddk.teacher.signals import Batch, SparseSignal

FORMAT_VERSION = 2
TOPK_FORMATS = (1, 2)  # format 1 is format 2 without tail samples
MANIFEST = "manifest.json"
SHARD_SEQUENCES = 64  # (choice) ~50 MB per shard at seq_len 2048, k = 64, a 150k vocabulary
LOGP_DTYPE = np.dtype(np.float16)
TAIL_DTYPE = np.dtype(np.float32)


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def bytes_per_token(k: int, vocab_size: int, samples: int = 0) -> int:
    """k ids and log-probs plus the log tail mass; with m tail samples, m more ids and log-probs
    plus the tail proposal's log normaliser."""
    entry = id_dtype(vocab_size).itemsize + LOGP_DTYPE.itemsize
    return (k + samples) * entry + TAIL_DTYPE.itemsize * (2 if samples else 1)


# ---------------------------------------------------------------------------------- identity
def _teacher_folder(name: str) -> Path:
    from ddk.models import local_model_folder

    folder = local_model_folder(name, "teacher")
    if folder is None:
        raise DDKError(
            f"teacher '{name}' is not a local folder or a downloaded hub model; its weights must "
            "be on disk to fingerprint the cache"
        )
    return folder


def teacher_on_disk(name: str) -> bool:
    """Whether the teacher's files are on this machine (an offline run may lack them)."""
    try:
        _teacher_folder(name)
    except DDKError:
        return False
    return True


def teacher_fingerprint(name: str) -> str:
    """SHA-256 over the teacher's config.json and the SHA-256 of each weight file."""
    from ddk.models import model_fingerprint

    folder = _teacher_folder(name)
    fingerprint = model_fingerprint(folder)
    if fingerprint is None:
        raise DDKError(f"teacher '{name}' has no weight files in '{folder}'")
    return fingerprint


def _as_dict(manifest) -> dict:
    """The prepared manifest as plain JSON data (it may be a dict or a pydantic model)."""
    return manifest.model_dump(mode="json") if hasattr(manifest, "model_dump") else manifest


def data_fingerprint(manifest) -> str:
    """Identifies the prepared training tokens of every domain (not only a run's subset)."""
    manifest = _as_dict(manifest)
    key = {
        "created": manifest.get("created"),
        "vocab_sha256": manifest["tokenizer"].get("vocab_sha256"),
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "seq_len": manifest["seq_len"],
        "token_dtype": manifest["token_dtype"],
        "domains": {
            n: [d["train_tokens"], d["train_sequences"]] for n, d in manifest["domains"].items()
        },
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _identity(m: dict) -> dict:
    """What a cache must agree on to be resumed (or used by a run)."""
    keys = ("format_version", "teacher_fingerprint", "data_fingerprint", "k", "tau", "samples")
    return {k: m.get(k) for k in (*keys, "proposal_power", "domains")}


def cache_samples(m: dict) -> int:
    """Tail samples per token of a cache manifest (0: top-k only, as every format-1 cache)."""
    return int(m.get("samples") or 0)


def _layout(m: dict, sequences: int) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each array of a shard of ``sequences`` sequences, in file order."""
    L, k, s, dt = m["seq_len"], int(m["k"]), cache_samples(m), m["dtypes"]
    arrays = [("ids", (k,)), ("logp", (k,)), ("log_tail", ())]
    if s:
        arrays += [("sample_ids", (s,)), ("sample_logp", (s,)), ("log_norm", ())]
    return [(name, np.dtype(dt[name]), (sequences, L, *tail)) for name, tail in arrays]


def _sample_key(data_fp: str, domain: str) -> int:
    """The seed of a domain's draws: a hash of the data fingerprint and the domain name."""
    return int.from_bytes(hashlib.sha256(f"{data_fp}/{domain}".encode()).digest()[:8], "little")


def position_uniforms(m: dict, domain: str, sequences: list[int]) -> np.ndarray:
    """[len(sequences) * L] uniforms of the tail draws: one per (sequence, position)."""
    L = m["seq_len"]
    counters = np.asarray(sequences, dtype=np.uint64)[:, None] * np.uint64(L) + np.arange(
        L, dtype=np.uint64
    )
    return counter_uniforms(_sample_key(m["data_fingerprint"], domain), counters.ravel())


def read_cache_manifest(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise DDKError(
            f"'{folder}' holds no teacher cache (no {MANIFEST}); run `ddk cache-teacher`"
        )
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DDKError(f"{path} is corrupt (not JSON); run `ddk cache-teacher` again") from None
    # Prepared data also has a manifest.json: name the mix-up instead of a format mismatch.
    if not isinstance(m, dict) or "teacher_fingerprint" not in m:
        what = " (it is prepared data)" if isinstance(m, dict) and "format" in m else ""
        raise DDKError(
            f"'{folder}' is not a teacher cache{what}; point teacher.cache at a "
            "`ddk cache-teacher` folder"
        )
    return m


def _check_target(folder: Path) -> None:
    """Refuse to write a cache into anything but a new or empty folder or a cache: shards and
    a manifest.json mixed into a user's folder (or prepared data) would be hard to undo."""
    if folder.exists() and not folder.is_dir():
        raise DDKError(f"teacher.cache: '{folder}' is a file; set it to a new folder")
    if (folder / MANIFEST).exists():
        read_cache_manifest(folder)  # raises unless it is a cache
    elif folder.is_dir() and any(
        p.name not in (LOCK_NAME, MANIFEST + ".tmp") for p in folder.iterdir()
    ):  # the lock and a half-written manifest: what a run killed before its first shard leaves
        raise DDKError(
            f"teacher.cache: '{folder}' is a non-empty folder that holds no teacher cache; set "
            "teacher.cache to a new or empty folder"
        )


def _finished(folder: Path, plan: dict) -> bool:
    """A complete cache of exactly this plan with every shard present: a rerun loads no teacher
    and never marks the cache incomplete under a run that reads it."""
    try:
        old = read_cache_manifest(folder)
    except DDKError:
        return False
    return (
        bool(old.get("complete"))
        and _identity(old) == _identity(plan)
        and all(
            _shard_path(folder, info, j).exists()
            for info in old["domains"].values()
            for j in range(info["shards"])
        )
    )


def _write_json(path: Path, obj: dict) -> None:
    # A fixed temporary name, not fileutil.write_json_atomic's random one: `_check_target`
    # recognises `manifest.json.tmp` as what a run killed mid-write leaves behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _shard_path(folder: Path, info: dict, shard: int) -> Path:
    return folder / info["folder"] / f"{shard:06d}.bin"


def _shard_bytes(m: dict, sequences: int) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in _layout(m, sequences))


def _shard_sequences(m: dict, info: dict, shard: int) -> int:
    return min(m["shard_sequences"], info["sequences"] - shard * m["shard_sequences"])


# ---------------------------------------------------------------------------------- building
@torch.no_grad()
def _topk_rows(
    model,
    seqs: torch.Tensor,
    *,
    vocab: int,
    k: int,
    tau: float,
    chunk: int,
    autocast,
    samples: int = 0,
    uniforms: np.ndarray | None = None,
):
    """Numpy arrays [B*L, ...] in ``_layout`` order: (ids, logp, log_tail) of the teacher's
    top-k at tau, then with ``samples`` (and one uniform per row) the tail draws
    (sample_ids, sample_logp, log_norm)."""
    from ddk.models import hidden_and_head

    with autocast():
        hidden, head = hidden_and_head(model, seqs[:, :-1])
    hidden = hidden.reshape(-1, hidden.shape[-1])
    transform = logit_transform(model)
    weight = head.weight[:vocab]
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias[:vocab]
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], weight, bias).float()
        if transform is not None:
            logits = transform(logits)
        if samples:
            u = torch.from_numpy(uniforms[start : start + chunk])
            logp_dtype = getattr(torch, LOGP_DTYPE.name)
            s, log_norm = sampled_from_logits(logits, k, samples, tau, u, logp_dtype=logp_dtype)
            arrays = (s.ids, s.logp, s.log_tail, s.sample_ids, s.sample_logp, log_norm)
        else:
            arrays = sparse_from_logits(logits, k, tau)[:3]
        dtypes = (id_dtype(vocab), LOGP_DTYPE, TAIL_DTYPE) * 2
        parts.append([a.cpu().numpy().astype(d) for a, d in zip(arrays, dtypes)])
    return [np.concatenate(p) for p in zip(*parts)]


def _write_shard(path: Path, arrays: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for a in arrays:
            fh.write(np.ascontiguousarray(a).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _plan(cfg, data, teacher_fp: str) -> dict:
    vocab = data.vocab_size
    manifest = _as_dict(data.manifest)
    k = cfg.teacher.cache_k
    if k > vocab:
        raise DDKError(f"teacher.cache_k {k} exceeds the vocabulary ({vocab} tokens); lower it")
    samples = cfg.teacher.cache_samples if cfg.teacher.sparse_estimator == "sampled" else 0
    dtypes = {"ids": id_dtype(vocab).name, "logp": LOGP_DTYPE.name, "log_tail": TAIL_DTYPE.name}
    if samples:
        dtypes.update(
            sample_ids=dtypes["ids"], sample_logp=dtypes["logp"], log_norm=dtypes["log_tail"]
        )
    return {
        "format_version": FORMAT_VERSION,
        "teacher": cfg.model.teacher,
        "teacher_fingerprint": teacher_fp,
        "data_fingerprint": data_fingerprint(manifest),
        "vocab_size": vocab,
        "vocab_sha256": manifest["tokenizer"].get("vocab_sha256"),
        "seq_len": data.seq_len,
        "k": k,
        "tau": float(cfg.distill.tau),
        "samples": samples,
        "proposal_power": PROPOSAL_POWER if samples else None,
        "shard_sequences": SHARD_SEQUENCES,
        "dtypes": dtypes,
        "bytes_per_token": bytes_per_token(k, vocab, samples),
        "domains": {
            n: {
                "folder": manifest["domains"][n]["folder"],
                "sequences": s.num_train_sequences,
                "shards": math.ceil(s.num_train_sequences / SHARD_SEQUENCES),
            }
            for n, s in data.domains.items()
        },
        "complete": False,
    }


def build_cache(cfg, progress: bool = True) -> Path:
    """Run the teacher over every training sequence of `data.prepared` (the `data.domains`
    subset if set) and write the cache to `teacher.cache`. Resumes an interrupted cache."""
    from ddk.data.dataset import PreparedData
    from ddk.evaluate import run_perplexities
    from ddk.lock import FolderLock
    from ddk.models import check_vocab, embedding_rows, load_teacher, resolve_dtype
    from ddk.runtime import Runtime

    if not cfg.teacher.cache:
        raise DDKError("teacher.cache: required (the folder to write the cache to)")
    if not cfg.model.teacher:
        raise DDKError("model.teacher: required (the teacher to cache)")
    if not cfg.data.prepared:
        raise DDKError("data.prepared: required (the output folder of `ddk prepare`)")
    folder = Path(cfg.teacher.cache).expanduser()
    rt = Runtime()
    if rt.is_main:
        _check_target(folder)
    lock = FolderLock(folder, "write the cache").acquire() if rt.is_main else None
    try:
        data = PreparedData(cfg.data.prepared, cfg.data.domains)
        plan = _plan(cfg, data, teacher_fingerprint(cfg.model.teacher))
        if _finished(folder, plan):  # every rank sees the same: rank 0 writes nothing here
            if rt.is_main:
                print(f"'{folder}' already holds this cache; nothing to do")
            return folder
        if rt.is_main:
            if (folder / MANIFEST).exists():
                old = read_cache_manifest(folder)
                if _identity(old) != _identity(plan):
                    raise DDKError(
                        f"'{folder}' holds a cache of another teacher, data, domains, k, tau, "
                        "sampling or format; set teacher.cache to a new folder (or delete this one)"
                    )
                plan = {**old, "complete": False}
            for stale in folder.glob("*/*.tmp"):  # from a killed run: never complete
                stale.unlink()
            _write_json(folder / MANIFEST, plan)
        rt.barrier()

        model = load_teacher(
            cfg.model.teacher,
            dtype=resolve_dtype(cfg.model.dtype, rt.device),
            trust_remote_code=cfg.model.trust_remote_code,
        ).to(rt.device)
        check_vocab(data.vocab_size, embedding_rows(model), embedding_rows(model))
        shards = [(n, j) for n, info in plan["domains"].items() for j in range(info["shards"])]
        mine = shards[rt.rank :: rt.world_size]
        todo = [(n, j) for n, j in mine if not _shard_path(folder, plan["domains"][n], j).exists()]

        def tokens(shards):
            return data.seq_len * sum(
                _shard_sequences(plan, plan["domains"][n], j) for n, j in shards
            )

        with tqdm(
            total=tokens(mine),
            initial=tokens(mine) - tokens(todo),
            desc="cache-teacher",
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
            # `disable=False` would override TQDM_DISABLE: pass it only to switch the bar off.
            **({} if progress and rt.is_main else {"disable": True}),
        ) as bar:
            for name, j in todo:
                info = plan["domains"][name]
                m = _shard_sequences(plan, info, j)
                first = j * SHARD_SEQUENCES
                pieces = []
                for start in range(0, m, cfg.trainer.eval_batch_size):
                    idx = range(first + start, first + min(m, start + cfg.trainer.eval_batch_size))
                    seqs = data.domains[name].sequences("train", list(idx)).to(rt.device)
                    pieces.append(
                        _topk_rows(
                            model,
                            seqs,
                            vocab=data.vocab_size,
                            k=plan["k"],
                            tau=plan["tau"],
                            chunk=cfg.distill.loss_chunk_tokens,
                            autocast=rt.autocast,
                            samples=cache_samples(plan),
                            uniforms=position_uniforms(plan, name, list(idx)),
                        )
                    )
                arrays = [np.concatenate(p) for p in zip(*pieces)]
                _write_shard(_shard_path(folder, info, j), arrays)
                bar.update(m * data.seq_len)
        rt.barrier()

        # The teacher's exact perplexities (full softmax, not top-k): DDK's Eq. 1/2 use them.
        ppl = {}
        for split in ("val", "test"):
            if split == "test" and not data.has_split("test"):
                continue  # data prepared before test splits
            result = run_perplexities(cfg, model, data, split, rt.autocast)
            ppl[split] = {d: r["ppl"] for d, r in result.items()}
        if rt.is_main:
            missing = [
                str(_shard_path(folder, plan["domains"][n], j))
                for n, j in shards
                if not _shard_path(folder, plan["domains"][n], j).exists()
            ]
            if missing:
                raise DDKError(f"{len(missing)} cache shards are missing (first: {missing[0]})")
            plan["teacher_ppl"] = ppl
            plan["complete"] = True
            _write_json(folder / MANIFEST, plan)
            tokens = sum(i["sequences"] for i in plan["domains"].values()) * data.seq_len
            sampled = f" + {plan['samples']} tail samples" if cache_samples(plan) else ""
            print(
                f"cached {tokens} tokens x top-{plan['k']}{sampled} in {folder} "
                f"({plan['bytes_per_token']} bytes/token)"
            )
        rt.barrier()
        return folder
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------- checks
def cache_problems(cfg, prepared_manifest, domains: list[str]) -> list[str]:
    """Preflight for `teacher.mode: offline`: every reason the cache cannot serve this run."""
    prepared_manifest = None if prepared_manifest is None else _as_dict(prepared_manifest)
    if not cfg.teacher.cache:
        return ["teacher.cache: required with teacher.mode offline (a `ddk cache-teacher` folder)"]
    try:
        m = read_cache_manifest(cfg.teacher.cache)
    except DDKError as e:
        return [f"teacher.cache: {e}"]
    where = f"teacher.cache: '{cfg.teacher.cache}'"
    problems = []
    if m.get("format_version") not in TOPK_FORMATS:
        return [f"{where} has cache format {m.get('format_version')}; build it again"]
    if cfg.teacher.sparse_estimator == "sampled" and not cache_samples(m):
        return [
            f"{where} holds no tail samples (top-k only: built with sparse_estimator topk or by "
            "an older ddk); rebuild it with `ddk cache-teacher` or set "
            "teacher.sparse_estimator=topk"
        ]
    if not m.get("complete"):
        problems.append(f"{where} is incomplete; finish it with `ddk cache-teacher`")
    if int(m["k"]) != cfg.teacher.cache_k:  # k only sets how a cache is built: say which one
        print(
            f"warning: {where} holds the teacher's top-{m['k']}, not teacher.cache_k="
            f"{cfg.teacher.cache_k}; distilling with k = {m['k']}"
        )
    if cfg.teacher.sparse_estimator == "sampled" and cache_samples(m) != cfg.teacher.cache_samples:
        print(
            f"warning: {where} holds {cache_samples(m)} tail samples per token, not "
            f"teacher.cache_samples={cfg.teacher.cache_samples}; distilling with "
            f"{cache_samples(m)}"
        )
    if float(m["tau"]) != float(cfg.distill.tau):
        problems.append(
            f"{where} was built at tau {m['tau']} but distill.tau is {cfg.distill.tau}; use the "
            "same tau or build a cache for it"
        )
    if prepared_manifest is not None:
        if m["vocab_size"] != prepared_manifest["tokenizer"]["vocab_size"] or m.get(
            "vocab_sha256"
        ) != prepared_manifest["tokenizer"].get("vocab_sha256"):
            problems.append(f"{where} was built for another vocabulary than data.prepared's")
        elif m["data_fingerprint"] != data_fingerprint(prepared_manifest):
            problems.append(
                f"{where} was built from other prepared data than '{cfg.data.prepared}'; run "
                "`ddk cache-teacher` on this data"
            )
        absent = [d for d in domains if d not in m["domains"]]
        if absent:
            problems.append(
                f"{where} has no domain '{absent[0]}'; cache it or drop it from the run"
            )
    if cfg.model.teacher and not teacher_on_disk(cfg.model.teacher):
        # Training off the teacher's machine: only the name it was cached under can be compared.
        if m.get("teacher") != cfg.model.teacher:
            problems.append(
                f"{where} was built by another teacher ('{m.get('teacher')}') than "
                f"model.teacher '{cfg.model.teacher}'"
            )
    elif cfg.model.teacher:
        try:
            fp = teacher_fingerprint(cfg.model.teacher)
        except DDKError as e:
            problems.append(f"model.teacher: {e}")
        else:
            if fp != m["teacher_fingerprint"]:
                problems.append(
                    f"{where} was built by another teacher ('{m.get('teacher')}') than "
                    f"model.teacher '{cfg.model.teacher}'"
                )
    return problems


# ---------------------------------------------------------------------------------- reading
class OfflineTeacher:
    """A `TeacherSource` that reads the cache: sparse signals, and the cached perplexities.

    ``estimator`` "sampled" hands the loss the tail samples too, "topk" only the top-k and the
    tail mass; None: whatever the cache holds."""

    MAX_OPEN = 128  # shard memmaps kept open (each holds a file descriptor)

    def __init__(
        self,
        folder: str | Path,
        domains: list[str],
        device: torch.device,
        estimator: str | None = None,
    ):
        self.folder = Path(folder).expanduser()
        self.manifest = read_cache_manifest(self.folder)
        self.domains = list(domains)
        self.device = device
        self.k = int(self.manifest["k"])
        self.tau = float(self.manifest["tau"])
        self.samples = cache_samples(self.manifest)
        if estimator == "sampled" and not self.samples:
            raise DDKError(
                f"teacher cache '{self.folder}' holds no tail samples; rebuild it with "
                "`ddk cache-teacher` or set teacher.sparse_estimator=topk"
            )
        self.sampled = bool(self.samples) and estimator != "topk"
        self._maps: collections.OrderedDict = collections.OrderedDict()

    def _shard(self, name: str, shard: int):
        key = (name, shard)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        m, info = self.manifest, self.manifest["domains"][name]
        n = _shard_sequences(m, info, shard)
        path = _shard_path(self.folder, info, shard)
        if not path.is_file() or path.stat().st_size != _shard_bytes(m, n):
            raise DDKError(
                f"teacher cache shard '{path}' is missing or truncated; rebuild the cache"
            )
        arrays, offset = [], 0
        for _, dtype, shape in _layout(m, n):
            arrays.append(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
            offset += math.prod(shape) * dtype.itemsize
        self._maps[key] = arrays
        if len(self._maps) > self.MAX_OPEN:
            self._maps.popitem(last=False)
        return arrays

    def signal(self, batch: Batch) -> SparseSignal:
        per = self.manifest["shard_sequences"]
        L = batch.input_ids.shape[1]
        if L != self.manifest["seq_len"]:
            raise DDKError(f"teacher cache has {self.manifest['seq_len']} tokens per row, not {L}")
        pairs = np.asarray(batch.rows).tolist()
        shards = [self._shard(self.domains[d], i // per) for d, i in pairs]

        def stacked(j: int) -> torch.Tensor:  # array j of _layout, rows of the batch
            arr = np.stack([arrays[j][i % per] for arrays, (_, i) in zip(shards, pairs)])
            arr = arr.astype(np.int64 if j in (0, 3) else np.float32, copy=False)  # ids: 0, 3
            return torch.from_numpy(arr.reshape(-1, *arr.shape[2:])).to(self.device)

        ids, logp, log_tail, *tail = (stacked(j) for j in range(6 if self.sampled else 3))
        if not tail:
            return SparseSignal(ids, logp, log_tail)
        sample_ids, sample_logp, log_norm = tail
        power = float(self.manifest["proposal_power"])
        logw = sample_log_weights(sample_logp, log_norm, self.samples, power)
        return SparseSignal(ids, logp, log_tail, sample_ids, sample_logp, logw)

    def perplexities(self, split: str = "val") -> dict[str, float] | None:
        ppl = self.manifest.get("teacher_ppl", {}).get(split)
        return None if ppl is None else {d: ppl[d] for d in self.domains}
