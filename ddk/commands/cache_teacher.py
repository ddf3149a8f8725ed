"""`ddk cache-teacher`: the teacher's next-token distribution over every training token, as a
top-k head plus sampled tail tokens (`ddk.teacher.sampling`), stored once (format:
`ddk.teacher.cache_format`), so `teacher.mode: offline` distils with no teacher loaded.

The teacher is loaded and placed as `teacher.placement` asks (replicated, sharded, CPU
offload). Under `accelerate launch` rank r writes shards r::world; a sharded teacher's forwards
are collectives, so every rank then runs as many forwards as the busiest one. Each shard is
written whole or not at all, so an interrupted run resumes with the missing shards and the
result is byte for byte what an uninterrupted run writes (each shard's batches are the same
either way).

With `teacher.tokenizer: cross` (a teacher with another tokenizer) the same machinery writes
format 3 (`ddk.teacher.cache_format`): per student position the live cross-tokenizer teacher's
(`ddk.teacher.crosstok`) top-k in its own vocabulary plus what the sparse cross loss needs
(`ddk.losses.crosstok_sparse`), the shared strings' ids, and the teacher's perplexities over
the same bytes the student scores.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddk import identity
from ddk.data.dataset import PreparedData
from ddk.data.split import HELDOUT_WINDOWS
from ddk.data.vocab import vocab_hash
from ddk.errors import DDKError
from ddk.evaluate import run_perplexities
from ddk.identity import Strength
from ddk.lock import LOCK_NAME, FolderLock
from ddk.losses.crosstok_sparse import sparse_cross_rows
from ddk.models import check_vocab, embedding_rows
from ddk.preflight import preflight
from ddk.ranks import print0
from ddk.runtime import Runtime
from ddk.teacher import cache_format
from ddk.teacher.cache_format import (
    CHECKSUMS_KEY,
    CONTENT_KEY,
    CROSS_FORMAT,
    FORMAT_VERSION,
    LOGP_DTYPE,
    MANIFEST,
    MODE_DTYPE,
    SHARD_SEQUENCES,
    SHARED_KEY,
    TAIL_DTYPE,
    bytes_per_token,
    cache_samples,
    check_target,
    cross_shard_arrays,
    id_dtype,
    is_cross,
    is_finished,
    position_uniforms,
    read_cache_manifest,
    same_cache,
    shard_arrays,
    shard_checksums,
    shard_path,
    shard_problem,
    shard_sequences,
    shared_bytes,
    write_cache_manifest,
    write_shared,
)
from ddk.teacher.crosstok import cross_tokenizers, load_cross_teacher, tokenizer_vocab
from ddk.teacher.engines import vllm as vllm_engine
from ddk.teacher.online import OnlineTeacher
from ddk.teacher.per_domain import teacher_groups
from ddk.teacher.perplexity import hash_memo
from ddk.teacher.placement import is_sharded, load_configured_teacher
from ddk.teacher.retokenize import CROSS_TEACHERS_ONLINE, several_cross_teachers, shared_vocabulary
from ddk.teacher.sampling import PROPOSAL_POWER
from ddk.teacher.signals import Batch


def build_cache(cfg, progress: bool = True, write_shard=None, runtime=None) -> Path:
    """Run the teacher over every training sequence of `data.prepared` (the `data.domains`
    subset if set) and write the cache to `teacher.cache`. Resumes an interrupted cache.
    `write_shard(path, arrays)` writes one shard (default: `cache_format.write_shard`)."""
    cross = cfg.teacher.tokenizer == "cross"
    for key, what in (
        ("teacher.cache", "the folder to write the cache to"),
        ("model.teacher", "the teacher to cache"),
        ("data.prepared", "the output folder of `ddk prepare`"),
        *([("model.student", "its tokenizer is matched with the teacher's")] if cross else []),
    ):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name):
            raise DDKError(f"{key}: required ({what})")
    if cfg.teacher.engine == "vllm":  # refused before anything is written or loaded
        if cross:
            raise DDKError(
                "teacher.engine: vllm caches a teacher with the student's tokenizer; build a "
                "teacher.tokenizer: cross cache with teacher.engine: hf"
            )
        problem = vllm_engine.settings_problem(cfg)
        if problem:
            raise DDKError(problem)
        vllm_engine.import_vllm()
    _preflight(cfg)
    problem = vllm_engine.cpu_problem(cfg) if cfg.teacher.engine == "vllm" else ""
    if problem:
        raise DDKError(problem)
    folder = Path(cfg.teacher.cache).expanduser()
    rt = runtime if runtime is not None else Runtime()
    if rt.is_main:
        check_target(folder)
    prepared = Path(cfg.data.prepared).expanduser().resolve()
    if folder.resolve().is_relative_to(prepared):
        raise DDKError(
            f"teacher.cache '{folder}' lies inside the prepared data '{cfg.data.prepared}'; "
            "write the cache to a folder of its own"
        )
    created = not folder.exists()
    lock = FolderLock(folder, "write the cache").acquire() if rt.is_main else None
    try:
        write_shard = write_shard or cache_format.write_shard
        _build_locked(cfg, folder, rt, progress, write_shard)
        return folder
    except BaseException:
        # Refused before anything was written: leave no folder holding only the lock
        # (removed while still held, so no other process locks a file about to vanish).
        if lock is not None and created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            (folder / LOCK_NAME).unlink()
            lock.release()
            folder.rmdir()
        raise
    finally:
        if lock is not None:
            lock.release()


def _preflight(cfg) -> None:
    """distill's checks of the data against the models (tokenizer, vocabulary, context
    length), as the run that will read this cache makes them: a cache for data the teacher
    cannot serve would only fail there, after the cost of building it. The cache itself does
    not exist yet, so they run as for an online teacher."""
    if several_cross_teachers(cfg):
        raise DDKError(CROSS_TEACHERS_ONLINE)
    model = {"student": cfg.model.student or cfg.model.teacher}
    check = cfg.model_copy(
        update={
            "teacher": cfg.teacher.model_copy(update={"mode": "online"}),
            "model": cfg.model.model_copy(update=model),
        }
    )
    preflight(check, teachers_at_once=False)


def _build_locked(cfg, folder: Path, rt, progress: bool, write_shard) -> None:
    data = PreparedData(cfg.data.prepared, cfg.data.domains)
    if cfg.teacher.engine == "vllm":
        _check_vllm_fits(cfg, data)
    plan = rt.main_result(lambda: _plan(cfg, data))  # hashes the data and teacher once
    if is_finished(folder, plan):  # every rank sees the same: rank 0 writes nothing here
        print0(f"'{folder}' already holds this cache; nothing to do")
        return
    if rt.is_main:
        plan = _begin(folder, plan)
        if is_cross(plan):
            write_shared(folder, _shared_file(cfg))
    rt.barrier()
    if cfg.teacher.engine == "vllm":
        ppl = _build_with_vllm(cfg, folder, plan, data, rt, progress, write_shard)
    elif is_cross(plan):
        ppl = _build_cross(cfg, folder, plan, data, rt, progress, write_shard)
    else:
        ppl: dict[str, dict[str, float]] = {}
        # One teacher at a time (model.teachers: each over the domains it serves), freed after.
        for name, domains in teacher_groups(cfg.model.domain_teachers(data.names)).items():
            built = _build_with_hf(
                cfg, name, domains, folder, plan, data, rt, progress, write_shard
            )
            for split, values in built.items():
                ppl.setdefault(split, {}).update(values)
    if rt.is_main:
        _finish(folder, plan, ppl, data.seq_len)
    rt.barrier()


def _check_vllm_fits(cfg, data: PreparedData) -> None:
    if len(set(cfg.model.domain_teachers(data.names).values())) > 1:
        raise DDKError(
            "teacher.engine: vllm serves one teacher; build a per-domain teachers cache "
            "(model.teachers) with teacher.engine: hf"
        )
    if data.masked:  # packed conversations need per-conversation position ids
        raise DDKError(
            "teacher.engine: vllm cannot take the per-conversation position ids of packed chat "
            "data; build this cache with teacher.engine: hf"
        )


def _heldout_splits(data: PreparedData) -> list[str]:
    return ["val", "test"] if data.has_split("test") else ["val"]  # older data: no test split


def _build_with_hf(cfg, name, domains, folder, plan, data, rt, progress, write_shard) -> dict:
    """The shards of `domains` from teacher `name`'s transformers forward, then its perplexities
    on them: {split: {domain: ppl}}."""
    model = load_configured_teacher(cfg, rt, name)
    check_vocab(data.vocab_size, embedding_rows(model), embedding_rows(model))
    teacher = OnlineTeacher(model, rt.autocast)

    def rows(name, idx):
        inputs, _, positions = data.domains[name].train_batch(idx)
        return _rows(cfg, plan, teacher, _on(inputs, positions, rt), name, idx)

    # A sharded teacher's forward is a collective: every rank runs as many as the busiest one.
    sharded = is_sharded(teacher.model)
    batch = cfg.trainer.eval_batch_size
    rounds = _write_shards(
        folder, plan, data, rt, progress, write_shard, rows, batch, domains, sharded
    )
    _throwaway_forwards(rows, data, rounds)
    rt.barrier()
    # The teacher's exact perplexities (full softmax, not top-k): DDK's Eq. 1/2 use them.
    ppl = {}
    for split in _heldout_splits(data):
        result = run_perplexities(cfg, model, data, split, rt, domains=domains)
        ppl[split] = {d: r["ppl"] for d, r in result.items()}
    return ppl  # the model is freed with this frame, before the next teacher loads


def _build_cross(cfg, folder, plan, data, rt, progress, write_shard) -> dict:
    """Format 3 (module doc): the shards from the live cross-tokenizer teacher, then its
    perplexities over the held-out bytes (in student-token units, as an online run's)."""
    teacher = load_cross_teacher(cfg, data, rt)
    k, tau, chunk = plan["k"], plan["tau"], cfg.distill.loss_chunk_tokens

    def rows(name, idx):
        inputs, _, _ = data.domains[name].train_batch(idx)
        where = np.asarray([[data.names.index(name), i] for i in idx])
        signal = teacher.signal(Batch(inputs, where))
        return cross_shard_arrays(sparse_cross_rows(signal, k, tau, chunk), teacher.vocab)

    batch, sharded = cfg.trainer.eval_batch_size, is_sharded(teacher.model)
    rounds = _write_shards(folder, plan, data, rt, progress, write_shard, rows, batch,
                           sharded=sharded)  # fmt: skip
    _throwaway_forwards(rows, data, rounds)
    rt.barrier()
    return {split: teacher.perplexities(split) for split in _heldout_splits(data)}


def _build_with_vllm(cfg, folder, plan, data, rt, progress, write_shard) -> dict:
    """The shards and the teacher's perplexities from one vLLM engine per rank
    (`ddk.teacher.engines.vllm`): a shard is one engine call, so a resumed shard is computed
    exactly as in an uninterrupted run."""
    tp = cfg.teacher.vllm.tensor_parallel_size
    vllm_engine.pin_devices(tp, rt.world_size)
    rows_in_head = vllm_engine.teacher_rows(cfg)
    check_vocab(data.vocab_size, rows_in_head, rows_in_head)
    engine = vllm_engine.VLLMTeacher(cfg, k=plan["k"], vocab=data.vocab_size, rows=rows_in_head)
    try:

        def rows(name, idx):
            seqs = data.domains[name].sequences("train", idx)
            return shard_arrays(engine.topk(seqs.numpy()), plan["vocab_size"])

        _write_shards(folder, plan, data, rt, progress, write_shard, rows, SHARD_SEQUENCES)
        rt.barrier()
        ppl = {}
        for split in _heldout_splits(data):
            sums = engine.heldout_sums(data, split, rt.rank, rt.world_size)
            total = rt.reduce_sum(torch.from_numpy(sums).to(rt.device)).cpu().numpy()
            ppl[split] = vllm_engine.perplexities(total, data.names)
        return ppl
    finally:
        engine.close()


def _plan(cfg, data: PreparedData) -> dict:
    """The manifest of the cache `cfg` asks for (incomplete until every shard is written)."""
    vocab = data.vocab_size
    manifest = data.manifest
    k = cfg.teacher.cache_k
    cross = _cross_entries(cfg) if cfg.teacher.tokenizer == "cross" else {}
    top = cross.get("teacher_vocab_size", vocab)  # the vocabulary the top-k is taken in
    if k > top:
        raise DDKError(f"teacher.cache_k {k} exceeds the vocabulary ({top} tokens); lower it")
    samples = cfg.teacher.cache_samples if cfg.teacher.sparse_estimator == "sampled" else 0
    samples = 0 if cross else samples  # a cross cache holds the top-k only
    dtypes = {"ids": id_dtype(top).name, "logp": LOGP_DTYPE.name, "log_tail": TAIL_DTYPE.name}
    if samples:
        dtypes.update(
            sample_ids=dtypes["ids"], sample_logp=dtypes["logp"], log_norm=dtypes["log_tail"]
        )
    if cross:
        dtypes.update(log_shared=TAIL_DTYPE.name, mode=MODE_DTYPE.name)
    memo = hash_memo(cfg)
    return {
        "format_version": FORMAT_VERSION,
        "teacher": cfg.model.teacher,
        "teacher_fingerprint": identity.teacher_fingerprint(cfg.model.teacher, memo),
        "data_fingerprint": identity.record_fingerprint(manifest),
        CONTENT_KEY: identity.data_fingerprint(data.folder, Strength.CONTENT, memo=memo),
        "vocab_size": vocab,
        "vocab_sha256": manifest.tokenizer.vocab_sha256,
        "seq_len": data.seq_len,
        "k": k,
        "tau": float(cfg.distill.tau),
        "samples": samples,
        "proposal_power": PROPOSAL_POWER if samples else None,
        "shard_sequences": SHARD_SEQUENCES,
        "dtypes": dtypes,
        "bytes_per_token": bytes_per_token(k, top, samples, cross=bool(cross)),
        "domains": _domain_entries(cfg, data, memo),
        "complete": False,
        **cross,
    }


def _cross_entries(cfg) -> dict:
    """A cross-tokenizer cache's own manifest entries: its format, the teacher's vocabulary
    (size and hash) and the checksum of the shared strings' ids (`shared.npy`)."""
    teacher, student = cross_tokenizers(cfg)
    shared = shared_vocabulary(student, teacher)
    return {
        "format_version": CROSS_FORMAT,
        "tokenizer": "cross",
        "teacher_vocab_size": tokenizer_vocab(teacher),
        "teacher_vocab_sha256": vocab_hash(teacher),
        "shared_strings": len(shared[0]),
        SHARED_KEY: hashlib.sha256(shared_bytes(*shared)).hexdigest(),
    }


def _shared_file(cfg) -> bytes:
    """`shared.npy` of a cross-tokenizer cache: the token strings both tokenizers hold."""
    teacher, student = cross_tokenizers(cfg)
    return shared_bytes(*shared_vocabulary(student, teacher))


def _domain_entries(cfg, data: PreparedData, memo) -> dict:
    """Each domain's shard layout and, with `model.teachers` naming 2+ teachers, the teacher
    that serves it with its fingerprint (one teacher: it is the manifest's `teacher`)."""
    mapping = cfg.model.domain_teachers(data.names)
    groups = teacher_groups(mapping)
    fingerprints = {t: identity.teacher_fingerprint(t, memo) for t in groups if len(groups) > 1}
    return {
        n: {
            "folder": data.manifest.domains[n].folder,
            "sequences": s.num_train_sequences,
            "shards": math.ceil(s.num_train_sequences / SHARD_SEQUENCES),
            **(
                {"teacher": mapping[n], "teacher_fingerprint": fingerprints[mapping[n]]}
                if fingerprints
                else {}
            ),
        }
        for n, s in data.domains.items()
    }


def _begin(folder: Path, plan: dict) -> dict:
    """Rank 0: refuse another cache in `folder`, clear a killed run's temporary shards and
    mark the cache incomplete. Returns the plan to finish (an existing cache's own)."""
    if (folder / MANIFEST).exists():
        old = read_cache_manifest(folder)
        if not same_cache(old, plan):
            raise DDKError(
                f"'{folder}' holds a cache of another teacher (or model.teachers), data, domains, k, tau, "
                "sampling or format; set teacher.cache to a new folder (or delete this one)"
            )
        plan = {**old, CONTENT_KEY: plan[CONTENT_KEY], "complete": False}
    for name, info in plan["domains"].items():
        for j in range(info["shards"]):
            shard = shard_path(folder, info, j)
            shard.with_name(shard.name + ".tmp").unlink(missing_ok=True)  # a killed run's
            if shard.exists() and shard_problem(folder, plan, name, j):
                shard.unlink()  # truncated or changed: written again below
    folder.mkdir(parents=True, exist_ok=True)
    write_cache_manifest(folder, plan)
    return plan


def _write_shards(
    folder, plan, data, rt, progress, write_shard, rows, batch: int, domains=None, sharded=False
) -> int:
    """Write this rank's missing shards of `domains` (default: all), `batch` sequences per
    `rows(domain, idx)` call. Returns how many throwaway forwards a `sharded` teacher still
    owes the busiest rank."""
    shards = [
        (n, j)
        for n, info in plan["domains"].items()
        if domains is None or n in domains
        for j in range(info["shards"])
    ]
    mine = shards[rt.rank :: rt.world_size]
    todo = [(n, j) for n, j in mine if not shard_path(folder, plan["domains"][n], j).exists()]

    def sequences(shards):
        return [shard_sequences(plan, plan["domains"][n], j) for n, j in shards]

    # A sharded teacher's forward is a collective: every rank runs as many as the busiest one
    # (agreed before any forward, so no other collective interleaves with them).
    forwards = sum(math.ceil(m / batch) for m in sequences(todo))
    if sharded:
        most = int(rt.reduce_max(torch.tensor([forwards], device=rt.device))[0])
    with tqdm(
        total=data.seq_len * sum(sequences(mine)),
        initial=data.seq_len * (sum(sequences(mine)) - sum(sequences(todo))),
        desc="cache-teacher",
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        # `disable=False` would override TQDM_DISABLE: pass it only to switch the bar off.
        **({} if progress and rt.is_main else {"disable": True}),
    ) as bar:
        for name, j in todo:
            info = plan["domains"][name]
            m = shard_sequences(plan, info, j)
            pieces = []
            for start in range(0, m, batch):
                first = j * SHARD_SEQUENCES + start
                idx = list(range(first, first + min(batch, m - start)))
                pieces.append(rows(name, idx))
            write_shard(shard_path(folder, info, j), [np.concatenate(p) for p in zip(*pieces)])
            bar.update(m * data.seq_len)
    return most - forwards if sharded else 0


def _rows(
    cfg, plan: dict, teacher: OnlineTeacher, batch: tuple, domain: str, idx: list[int]
) -> list[np.ndarray]:
    """The shard arrays of sequences `idx` of `domain` (`batch`: their inputs and position
    ids): the teacher's top-k at tau, then with samples the tail draws, each position with its
    own uniform. Chat data: every position is stored; the data's loss mask marks the ones a run
    counts, so rows stay fixed-size and found by index."""
    inputs, positions = batch
    common = dict(
        vocab=plan["vocab_size"], k=plan["k"], tau=plan["tau"], chunk=cfg.distill.loss_chunk_tokens,
        position_ids=positions,
    )  # fmt: skip
    if not cache_samples(plan):
        return shard_arrays(teacher.topk(inputs, **common), plan["vocab_size"])
    signal, log_norm = teacher.sampled(
        inputs,
        samples=cache_samples(plan),
        uniforms=torch.from_numpy(position_uniforms(plan, domain, idx)),
        logp_dtype=getattr(torch, LOGP_DTYPE.name),
        **common,
    )
    return shard_arrays(signal, plan["vocab_size"], log_norm)


def _throwaway_forwards(rows, data, count: int) -> None:
    """`count` calls of `rows` whose result is dropped: a sharded teacher's collectives on a
    rank with fewer shards to write than the busiest one."""
    for _ in range(count):
        rows(next(iter(data.domains)), [0])


def _on(inputs: torch.Tensor, positions, rt) -> tuple:
    """(inputs, position ids or None) on the runtime's device."""
    return inputs.to(rt.device), None if positions is None else positions.to(rt.device)


def _finish(folder: Path, plan: dict, ppl: dict, seq_len: int) -> None:
    """Rank 0: check every shard is there, record the perplexities and mark the cache done."""
    missing = [
        str(shard_path(folder, info, j))
        for info in plan["domains"].values()
        for j in range(info["shards"])
        if not shard_path(folder, info, j).exists()
    ]
    if missing:
        raise DDKError(f"{len(missing)} cache shards are missing (first: {missing[0]})")
    plan[CHECKSUMS_KEY] = shard_checksums(folder, plan)
    plan["teacher_ppl"] = ppl
    plan["teacher_ppl_windows"] = HELDOUT_WINDOWS
    plan["complete"] = True
    write_cache_manifest(folder, plan)
    tokens = sum(i["sequences"] for i in plan["domains"].values()) * seq_len
    sampled = f" + {plan['samples']} tail samples" if cache_samples(plan) else ""
    print0(
        f"cached {tokens} tokens x top-{plan['k']}{sampled} in {folder} "
        f"({plan['bytes_per_token']} bytes/token)"
    )
