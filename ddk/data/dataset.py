"""Reading prepared data: fixed-length token windows from each domain's memory-mapped shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddk.data.dedup import HASH_DTYPE
from ddk.data.manifest import SPLITS, DomainInfo, Manifest, confine, domain_path, read_manifest
from ddk.errors import DDKError


class DomainShard:
    """One domain's train, validation and (when prepared) test tokens.
    Sequence i of a split = tokens[i*L : (i+1)*L + 1]."""

    def __init__(self, folder: Path, name: str, info: DomainInfo, dtype: np.dtype, seq_len: int):
        self.name = name
        self.seq_len = seq_len
        self.info = info
        self.folder = folder
        self._dtype = dtype
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
        self._maps: dict[str, np.memmap] = {}

    def has_split(self, split: str) -> bool:
        return split in self._paths

    def num_sequences(self, split: str) -> int:
        """Windows of `split` ("train", "val" or "test")."""
        self._check_split(split)
        return int(self.info.sequences(split))

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

    def sequences(self, split: str, indices) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64 windows of `split`."""
        tokens = self._tokens(split)
        L = self.seq_len
        out = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = tokens[int(i) * L : int(i) * L + L + 1]
        return torch.from_numpy(out)

    def heldout_hashes(self) -> np.ndarray:
        """Sorted uint64 text hashes of this domain's validation and test documents (empty for
        data prepared before they were recorded)."""
        path = self.folder / "heldout_hashes.npy"
        if not path.is_file():
            return np.zeros(0, dtype=HASH_DTYPE)
        confine(self.folder, path)
        return np.load(path, allow_pickle=False).astype(HASH_DTYPE, copy=False)


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
                domain_path(self.folder, available[n]), n, available[n], dtype, self.seq_len
            )
            for n in names
        }

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def has_split(self, split: str) -> bool:
        """Whether every selected domain has `split`; data prepared before the test split has
        no "test" (callers then fall back to "val" and say so)."""
        return all(d.has_split(split) for d in self.domains.values())

    def train_tokens(self) -> dict[str, int]:
        return {n: d.train_tokens for n, d in self.domains.items()}
