"""Reading prepared data: fixed-length token windows from each domain's memory-mapped shard."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ddk.data.dedup import HASH_DTYPE
from ddk.data.manifest import (
    SPLITS,
    TEXT_FORMAT_VERSION,
    DomainInfo,
    Manifest,
    confine,
    domain_path,
    read_array,
    read_manifest,
)
from ddk.data.offsets import SplitSpans
from ddk.data.packing import MASK_SUFFIX, TARGET, position_ids
from ddk.data.split import window_spans
from ddk.errors import DDKError
from ddk.losses import IGNORE_INDEX


class DomainShard:
    """One domain's train, validation and (when prepared) test tokens.
    Training window i = tokens[i*L : (i+1)*L + 1]. A held-out window is one document's piece
    (`ddk.data.split.window_spans`): up to L + 1 tokens, never a token of another document."""

    def __init__(
        self,
        folder: Path,
        name: str,
        info: DomainInfo,
        dtype: np.dtype,
        seq_len: int,
        format_version: int = TEXT_FORMAT_VERSION,
        masked: bool = False,
    ):
        self.name = name
        self.seq_len = seq_len
        self.info = info
        self.folder = folder
        self._dtype = dtype
        self._format_version = format_version
        self._paths = {
            split: folder / f"{split}.bin" for split in SPLITS if info.tokens(split) is not None
        }
        for split, path in self._paths.items():
            confine(folder, path)
            expected = info.tokens(split) * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DDKError(
                    f"prepared shard '{path}' is missing or truncated; prepare the data again"
                )
        self.masked = masked  # chat data: a loss mask beside each split's tokens
        if masked:
            for split, path in self._paths.items():
                mask = path.with_suffix(MASK_SUFFIX)
                confine(folder, mask)
                if not mask.is_file() or mask.stat().st_size != info.tokens(split):
                    raise DDKError(
                        f"loss mask '{mask}' is missing or truncated; prepare the data again"
                    )
        self._maps: dict[str, np.memmap] = {}
        self._masks: dict[str, np.memmap] = {}
        self._spans: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._byte_spans: dict[str, SplitSpans] = {}

    def has_split(self, split: str) -> bool:
        return split in self._paths

    def num_sequences(self, split: str) -> int:
        """Windows of `split` ("train", "val" or "test")."""
        self._check_split(split)
        if split == "train":
            return int(self.info.sequences(split))
        return len(self._window_spans(split)[0])

    @property
    def train_tokens(self) -> int:
        return int(self.info.train_tokens)

    @property
    def num_train_sequences(self) -> int:
        return self.num_sequences("train")

    @property
    def num_val_sequences(self) -> int:
        return self.num_sequences("val")

    def _check_split(self, split: str) -> None:
        if split not in self._paths:
            if split in SPLITS:
                raise DDKError(
                    f"prepared data of domain '{self.name}' has no {split} split (prepared by an "
                    "older ddk); prepare it again"
                )
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def _tokens(self, split: str) -> np.memmap:
        if split not in self._maps:
            self._check_split(split)
            self._maps[split] = np.memmap(self._paths[split], dtype=self._dtype, mode="r")
        return self._maps[split]

    def _mask(self, split: str) -> np.memmap:
        if split not in self._masks:
            path = self._paths[split].with_suffix(MASK_SUFFIX)
            self._masks[split] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._masks[split]

    def train_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Training windows `indices` as (inputs, labels, position_ids) [len(indices), L]. Raw
        text: labels are the next tokens and position_ids None. Chat data: labels outside the
        loss mask are IGNORE_INDEX, and position ids restart at each packed conversation, so
        conversations sharing a row do not attend to each other (`ddk.data.packing`)."""
        seqs = self.sequences("train", indices)
        inputs, labels = seqs[:, :-1], seqs[:, 1:].clone()
        if not self.masked:
            return inputs, labels, None
        mask, L = self._mask("train"), self.seq_len
        rows = np.stack([mask[int(i) * L : int(i) * L + L + 1] for i in indices])
        labels[torch.from_numpy((rows[:, 1:] & TARGET) == 0)] = IGNORE_INDEX
        return inputs, labels, torch.from_numpy(position_ids(rows[:, :-1]))

    def sequences(self, split: str, indices) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64 training windows (held-out splits: `heldout_batch`)."""
        if split != "train":
            raise ValueError(f"held-out split {split!r} is read per document: use heldout_batch")
        tokens = self._tokens(split)
        L = self.seq_len
        out = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = tokens[int(i) * L : int(i) * L + L + 1]
        return torch.from_numpy(out)

    def _window_spans(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(start, tokens) of each window of held-out `split`, from `<split>_docs.npy` (the
        tokens each document contributed, back to back in `<split>.bin`; every format wrote it,
        so older data is cut per document the same way)."""
        if split not in self._spans:
            self._check_split(split)
            path = self.folder / f"{split}_docs.npy"
            docs = read_array(self.folder, path, np.dtype(np.int64), columns=2)
            stored = docs[:, 1]
            spans = window_spans(stored, self.seq_len)
            count = self.info.sequences(split)
            if (
                (stored < 0).any()
                or int(stored.sum()) != self.info.tokens(split)
                or (self._format_version >= 3 and len(spans[0]) != count)
            ):
                raise DDKError(
                    f"'{path}' does not match the manifest's {split} split of domain "
                    f"'{self.name}'; prepare the data again"
                )
            self._spans[split] = spans
        return self._spans[split]

    def window_lengths(self, split: str) -> np.ndarray:
        """Tokens of each held-out window (its targets are one fewer)."""
        return self._window_spans(split)[1]

    def heldout_batch(self, split: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows `indices` of held-out `split` as (inputs, labels), int64 [len(indices), T]
        with T the most targets among them: row r scores labels[r] from inputs[r]; positions
        past a window's document are padded (inputs 0, labels IGNORE_INDEX). The padding sits
        after every real token, so a causal model's scores of the real tokens never see it."""
        starts, lengths = self._window_spans(split)
        tokens = self._tokens(split)
        idx = np.asarray(list(indices), dtype=np.int64)
        width = int(lengths[idx].max()) - 1 if len(idx) else 0
        inputs = np.zeros((len(idx), width), dtype=np.int64)
        labels = np.full((len(idx), width), IGNORE_INDEX, dtype=np.int64)
        mask = self._mask(split) if self.masked else None
        for row, (start, n) in enumerate(zip(starts[idx].tolist(), lengths[idx].tolist())):
            window = tokens[start : start + n]
            inputs[row, : n - 1] = window[:-1]
            labels[row, : n - 1] = window[1:]
            if mask is not None:  # chat data: only the loss mask's targets count
                off = (mask[start + 1 : start + n] & TARGET) == 0
                labels[row, : n - 1][off] = IGNORE_INDEX
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def byte_spans(self, split: str) -> SplitSpans:
        """The text behind `split`'s tokens (data prepared with prepare.byte_spans)."""
        if split not in self._byte_spans:
            self._check_split(split)
            self._byte_spans[split] = SplitSpans(self.folder, split, self.info.tokens(split))
        return self._byte_spans[split]

    def window_start(self, split: str, index: int) -> tuple[int, int]:
        """(first token, tokens) of window `index` of `split` in its token file."""
        if split == "train":
            return int(index) * self.seq_len, self.seq_len + 1
        starts, lengths = self._window_spans(split)
        return int(starts[index]), int(lengths[index])

    def heldout_hashes(self) -> np.ndarray:
        """Sorted uint64 text hashes of this domain's validation and test documents (empty for
        data prepared before they were recorded)."""
        path = self.folder / "heldout_hashes.npy"
        if not path.is_file():
            return np.zeros(0, dtype=HASH_DTYPE)
        return read_array(self.folder, path, HASH_DTYPE)


def target_count(batches, device=None) -> torch.Tensor:
    """float64 scalar: the loss targets (labels not IGNORE_INDEX) of `train_batch` results."""
    total = sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _ in batches)
    return torch.tensor(float(total), dtype=torch.float64, device=device)


class PreparedData:
    """The output folder of `ddk prepare`, restricted to `domains` if given (manifest order)."""

    def __init__(self, folder: str | Path, domains: list[str] | None = None):
        self.folder = Path(folder).expanduser()
        if not self.folder.exists():
            raise DDKError(f"prepared data folder '{folder}' does not exist; run `ddk prepare`")
        self.manifest: Manifest = read_manifest(self.folder)
        self.seq_len = self.manifest.seq_len
        self.vocab_size = self.manifest.tokenizer.vocab_size
        dtype = np.dtype(self.manifest.token_dtype)
        available = self.manifest.domains
        if domains is not None:
            missing = [d for d in domains if d not in available]
            if missing:
                raise DDKError(
                    f"data.domains names '{missing[0]}', which is not in '{folder}' "
                    f"(it has: {', '.join(available)})"
                )
        names = domains if domains is not None else list(available)
        self.domains = {
            n: DomainShard(
                domain_path(self.folder, available[n]),
                n,
                available[n],
                dtype,
                self.seq_len,
                self.manifest.format_version,
                masked=self.manifest.chat is not None,
            )
            for n in names
        }
        if self.manifest.format_version < TEXT_FORMAT_VERSION:
            print(
                f"warning: '{folder}' was prepared by an older ddk (format "
                f"{self.manifest.format_version}): a text it holds out may be in another domain's "
                "training data; its held-out windows are cut per document. Prepare it again "
                "for held-out perplexities you can trust",
                file=sys.stderr,  # stdout may be `ddk eval --json`
            )

    @property
    def masked(self) -> bool:
        """Chat data: losses and perplexities count the loss mask's targets only."""
        return self.manifest.chat is not None

    @property
    def targets(self) -> str | None:
        """What losses and perplexities count, for reports: None for raw text (every token)."""
        chat = self.manifest.chat
        return None if chat is None else f"chat loss mask (prepare.train_on={chat.train_on})"

    def train_batch(self, rows, domains: list[str], device=None):
        """(inputs, labels, position_ids or None) of `rows` ((domain index into `domains`,
        window index) pairs), concatenated in order, on `device`."""
        parts = [self.domains[domains[d]].train_batch([j]) for d, j in rows]
        inputs, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        positions = torch.cat([p[2] for p in parts]).to(device) if self.masked else None
        return inputs.to(device), labels.to(device), positions

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    @property
    def has_byte_spans(self) -> bool:
        """Whether prepare stored every split's text and token byte ends (`ddk.data.offsets`)."""
        return bool((self.manifest.model_extra or {}).get("byte_spans"))

    def has_split(self, split: str) -> bool:
        """Whether every selected domain has `split`; data prepared before the test split has
        no "test" (callers then fall back to "val" and say so)."""
        return all(d.has_split(split) for d in self.domains.values())

    def train_tokens(self) -> dict[str, int]:
        return {n: d.train_tokens for n, d in self.domains.items()}
