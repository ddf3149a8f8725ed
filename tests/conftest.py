"""Shared fixtures: a real multi-domain corpus on disk, a tokenizer trained on it, tiny models
saved with save_pretrained. Everything is loaded back through the user's code path."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

# Progress bars go to stderr; tests that assert "one line on stderr" check ddk's messages. tqdm
# reads TQDM_* when it is imported (torch imports it), so this comes before any ddk import.
os.environ.setdefault("TQDM_DISABLE", "1")


from ddk.config import PrepareSection
from ddk.demo.build import tiny_causal_lm, train_bpe_tokenizer

WORDS = [
    "the",
    "model",
    "learns",
    "data",
    "from",
    "text",
    "and",
    "code",
    "with",
    "small",
    "steps",
    "over",
    "many",
    "domains",
]


def make_documents(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    docs = []
    for i in range(n):
        if domain == "code":
            lines = [
                f"def f{i}_{j}(x):\n    return x * {rng.randint(1, 99)} + {j}"
                for j in range(rng.randint(2, 6))
            ]
            docs.append("\n\n".join(lines) + "\n")
        elif domain == "prose":
            docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + ".")
        else:
            a, b = rng.randint(1, 500), rng.randint(1, 500)
            docs.append(f"Q: what is {a} plus {b}? A: {a} + {b} = {a + b}. ünïcødé ✓")
    return docs


def write_folder_corpus(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """One sub-folder per domain, mixing .jsonl, .txt and .parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = {}
    for domain, n in sizes.items():
        folder = root / domain
        folder.mkdir(parents=True)
        texts = make_documents(domain, n, seed)
        docs[domain] = texts
        third = len(texts) // 3
        with open(folder / "part0.jsonl", "w") as fh:
            for t in texts[:third]:
                fh.write(json.dumps({"text": t, "id": 1}) + "\n")
        for i, t in enumerate(texts[third : 2 * third]):
            (folder / f"doc{i:04d}.txt").write_text(t)
        pq.write_table(pa.table({"text": texts[2 * third :]}), folder / "part2.parquet")
    return docs


CORPUS_SIZES = {"code": 150, "prose": 220, "math": 400}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Teacher perplexities are cached under $XDG_CACHE_HOME (ddk.teacher.perplexity): keep the tests'
    out of the user's cache; subprocesses inherit the variable."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_folder_corpus(root, CORPUS_SIZES)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus) -> Path:
    _, docs = corpus
    texts = [t for d in docs.values() for t in d]
    return train_bpe_tokenizer(texts, 384, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    from ddk.data.prepare import prepare

    out = tmp_path_factory.mktemp("prep") / "data"
    cfg = PrepareSection(input=str(corpus[0]), output=str(out), seq_len=32, val_sequences=4)
    prepare(cfg, str(tokenizer_dir), progress=False)
    return out


def _save_model(path: Path, tokenizer_dir: Path, **kwargs) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_causal_lm(len(tok), **kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return _save_model(tmp_path_factory.mktemp("teacher"), tokenizer_dir, hidden_size=48, seed=1)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return _save_model(
        tmp_path_factory.mktemp("student"), tokenizer_dir, hidden_size=32, num_heads=2, seed=2
    )


@pytest.fixture(scope="session")
def save_model():
    return _save_model


@pytest.fixture
def crash_at_step(monkeypatch):
    """Make the trainer raise RuntimeError('crash') when it is about to run step `step` + 1;
    returns a function that takes the crash out again (the run can then resume)."""
    from ddk.trainer import Trainer

    original = Trainer.train_step

    def arm(step: int):
        def train_step(self, *args, **kwargs):
            if self.state.step == step:
                raise RuntimeError("crash")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, "train_step", train_step)
        return lambda: monkeypatch.setattr(Trainer, "train_step", original)

    return arm


@pytest.fixture(scope="session")
def format1_prepared_dir(tmp_path_factory, prepared_dir) -> Path:
    """`prepared_dir` as an older ddk (format 1) wrote it: no test split, no owner record."""
    import shutil

    old = tmp_path_factory.mktemp("format1") / "data"
    shutil.copytree(prepared_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("format", "owner", "test_sequences", "add_bos"):
        manifest.pop(key, None)
    manifest["format_version"] = 1
    for d in manifest["domains"].values():
        for key in ("test_documents", "test_tokens", "test_sequences", "duplicates_dropped"):
            d.pop(key, None)
        (old / d["folder"] / "test.bin").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


@pytest.fixture
def mount_tmpfs():
    """`mount_tmpfs(folder, options)` mounts a tmpfs on `folder` (a disk that can fill up, or a
    read-only one) and returns it; the test is skipped where this machine cannot mount one. The
    mounts go at teardown, lazily: a failed write may still hold a file open."""
    mounted: list[Path] = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                capture_output=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or 'not root'}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
