"""Shared fixtures: a real multi-domain corpus on disk, a tokenizer trained on it, tiny models
saved with save_pretrained. Everything is loaded back through the user's code path.

Shared helpers: `run_config` / `make_config` / `write_config` (the one tiny-run config
factory), `one_error_line` (the one check that a command failed with one line) and
`tree_digest` (what a folder holds, to show a refused command changed nothing)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

# Progress bars go to stderr; tests that assert "one line on stderr" check ddk's messages. tqdm
# reads TQDM_* when it is imported (torch imports it), so this comes before any ddk import.
os.environ.setdefault("TQDM_DISABLE", "1")


from ddk.config import Config, PrepareSection, load_config
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

# A run of a dozen steps on the tiny models: three intervals, checkpoints every four steps.
TINY_RUN = {
    "trainer.max_steps": 12,
    "trainer.micro_batch_size": 4,
    "trainer.grad_accum_steps": 2,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 2,
    "trainer.save_every": 4,
    "trainer.eval_batch_size": 4,
    "distill.K": 3,
    "distill.loss_chunk_tokens": 50,
}


def run_config(run_dir, teacher, student, prepared, base=TINY_RUN, **overrides) -> dict:
    """The one tiny-run config factory: {"section.key": value} for a run of `student` on
    `prepared` distilled from `teacher` into `run_dir`; `overrides` (dotted keys) win over
    `base`. A value of None leaves the key unset (null)."""
    return {
        "model.teacher": teacher,
        "model.student": student,
        "data.prepared": prepared,
        "trainer.output_dir": run_dir,
        **base,
        **overrides,
    }


# A run of 40 steps with a checkpoint every 5: time to kill it at a random point.
LONG_RUN = {
    "trainer.max_steps": 40,
    "trainer.micro_batch_size": 4,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 5,
    "trainer.save_every": 5,
    "trainer.keep_checkpoints": 3,
    "trainer.eval_batch_size": 4,
    "distill.K": 7,
}
# A run of 6 steps; its second interval (steps 4-5) is cut short by max_steps.
SHORT_RUN = {
    "trainer.max_steps": 6,
    "trainer.micro_batch_size": 4,
    "trainer.lr": 3e-3,
    "trainer.min_lr": 3e-4,
    "trainer.warmup_steps": 2,
    "trainer.log_every": 1,
    "trainer.save_every": 3,
    "trainer.eval_batch_size": 4,
    "distill.K": 4,
    "distill.loss_chunk_tokens": 64,
}


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def make_config(run_dir, teacher, student, prepared, base=TINY_RUN, **overrides) -> Config:
    """`run_config` validated into a Config (as `--set` overrides are)."""
    values = run_config(run_dir, teacher, student, prepared, base, **overrides)
    items = [f"{k}={v if isinstance(v, str | Path) else json.dumps(v)}" for k, v in values.items()]
    return load_config(None, items)


def write_config(path: Path, values: dict) -> str:
    """{"section.key": value} as a YAML file, unvalidated (a test may write a bad value)."""
    data: dict = {}
    for key, value in values.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = _plain(value)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def long_run_config(path: Path, teacher, student, prepared, run_dir, **extra) -> str:
    """A LONG_RUN config file."""
    return write_config(path, run_config(run_dir, teacher, student, prepared, LONG_RUN, **extra))


def world_config(path: Path, w: dict, run_dir: Path, **extra) -> str:
    """A SHORT_RUN config file on the `world` fixture's models and data."""
    values = run_config(run_dir, w["teacher"], w["student"], w["data"], SHORT_RUN, **extra)
    return write_config(path, values)


def one_error_line(stderr: str) -> str:
    """A command that failed as a user's error must print exactly one line, `error: ...`, and
    no traceback; returns that line."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def tree_digest(root: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file, folder and link under `root` (names in `ignore` left out) with its content
    hash (links are recorded, not followed): equal digests mean nothing there changed."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if name in ignore:
                continue
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                seen[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return dict(sorted(seen.items()))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Teacher perplexities are cached under $XDG_CACHE_HOME (ddk.teacher.perplexity): keep the tests'
    out of the user's cache; subprocesses inherit the variable."""
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


@pytest.fixture(scope="session")
def world(tmp_path_factory, teacher_dir, student_dir, prepared_dir):
    """Copies of the tiny models and data, a corrupt student, and two finished SHORT_RUNs:
    `base` (shared by the refusal cases, which copy it) and `run_d` on its own data copy."""
    from ddk.cli import main

    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "teacher": teacher_dir}
    shutil.copytree(student_dir, root / "student")
    w["student"] = root / "student"
    shutil.copytree(prepared_dir, root / "data")
    w["data"] = root / "data"
    corrupt = root / "corrupt_student"
    shutil.copytree(student_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    w["corrupt"] = corrupt
    assert main(["distill", world_config(root / "base.yaml", w, root / "base")]) == 0
    w["base"] = root / "base"
    shutil.copytree(prepared_dir, root / "data_d")
    cfg = world_config(root / "d.yaml", {**w, "data": root / "data_d"}, root / "run_d")
    assert main(["distill", cfg]) == 0
    w["run_d"] = root / "run_d"
    return w


def copy_run(w, name: str, edit: dict | None = None) -> Path:
    """A copy of the world's finished `base` run, its config.yaml edited as a user would."""
    run = w["root"] / f"resume_{name}"
    if not run.exists():
        shutil.copytree(w["base"], run)
    if edit:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        for key, value in edit.items():
            section, field = key.split(".")
            cfg[section][field] = value
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def user_folder(tmp_path: Path) -> Path:
    """A project folder holding the user's own (valid) ddk config.yaml and notes."""
    home = tmp_path / "project"
    home.mkdir()
    config = {
        "model": {"teacher": "t", "student": "s"},
        "data": {"prepared": str(tmp_path / "data")},
        "trainer": {"output_dir": str(home)},
    }
    (home / "config.yaml").write_text("# my settings\n" + yaml.safe_dump(config))
    (home / "notes.txt").write_text("mine")
    return home


def with_test_split(prepared_dir: Path, dest: Path, n: int = 4) -> Path:
    """A copy of the prepared data with a test split (windows unlike the validation ones)."""
    shutil.copytree(prepared_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    L = manifest["seq_len"]
    for info in manifest["domains"].values():
        folder = dest / info["folder"]
        tokens = np.fromfile(folder / "train.bin", dtype=manifest["token_dtype"])
        tokens[-(n * L + 1) :].tofile(folder / "test.bin")
        np.save(folder / "test_docs.npy", np.array([[0, n * L + 1]]))  # one document, n windows
        info["test_tokens"], info["test_sequences"] = n * L + 1, n
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


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
