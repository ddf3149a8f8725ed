"""Reading prepared data: fixed-length token windows from each domain's memory-mapped shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddk.data.prepare import read_manifest
from ddk.errors import DDKError


class DomainShard:
    """One domain's train, validation and (when prepared) test tokens.
    Sequence i = tokens[i*L : (i+1)*L + 1]."""

    def __init__(self, folder: Path, name: str, info: dict, dtype: np.dtype, seq_len: int):
        self.name = name
        self.seq_len = seq_len
        self.info = info
        self._dtype = dtype
        # "test" exists when prepare wrote one (manifest test_tokens); older data has none.
        splits = ("train", "val", "test") if "test_tokens" in info else ("train", "val")
        self._paths = {split: folder / f"{split}.bin" for split in splits}
        for split, path in self._paths.items():
            expected = info[f"{split}_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DDKError(
                    f"prepared shard '{path}' is missing or truncated; prepare the data again"
                )
        self._maps: dict[str, np.memmap] = {}

    @property
    def train_tokens(self) -> int:
        return int(self.info["train_tokens"])

    @property
    def num_train_sequences(self) -> int:
        return int(self.info["train_sequences"])

    @property
    def num_val_sequences(self) -> int:
        return int(self.info["val_sequences"])

    def has_split(self, split: str) -> bool:
        return split in self._paths

    def num_sequences(self, split: str) -> int:
        return int(self.info.get(f"{split}_sequences", 0)) if split in self._paths else 0

    def _tokens(self, split: str) -> np.memmap:
        if split not in self._maps:
            self._maps[split] = np.memmap(self._paths[split], dtype=self._dtype, mode="r")
        return self._maps[split]

    def sequences(self, split: str, indices) -> torch.Tensor:
        """[len(indices), seq_len + 1] int64 windows."""
        tokens = self._tokens(split)
        L = self.seq_len
        out = np.empty((len(indices), L + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = tokens[int(i) * L : int(i) * L + L + 1]
        return torch.from_numpy(out)


class PreparedData:
    """The output folder of `ddk prepare`, restricted to `domains` if given (manifest order)."""

    def __init__(self, folder: str | Path, domains: list[str] | None = None):
        self.folder = Path(folder).expanduser()
        if not self.folder.exists():
            raise DDKError(f"prepared data folder '{folder}' does not exist; run `ddk prepare`")
        self.manifest = read_manifest(self.folder)
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        dtype = np.dtype(self.manifest["token_dtype"])
        available = self.manifest["domains"]
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
                self.folder / available[n]["folder"], n, available[n], dtype, self.seq_len
            )
            for n in names
        }

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def has_split(self, split: str) -> bool:
        """Whether every selected domain has `split` (data prepared before test splits: no)."""
        return all(d.has_split(split) for d in self.domains.values())

    def train_tokens(self) -> dict[str, int]:
        return {n: d.train_tokens for n, d in self.domains.items()}

    def fingerprint(self) -> str:
        """Identifies the prepared data (for caching teacher perplexities)."""
        m = self.manifest
        return (
            f"{m['created']}|{m['tokenizer']['name_or_path']}|{m['seq_len']}|{sorted(self.domains)}"
        )
