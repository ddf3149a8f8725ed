"""Auto-domains: clusters recover hidden sources, deterministically, with bounded memory, and
the output is ordinary prepared data."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from ddk.cli import main
from ddk.config import Config, PrepareSection
from ddk.data import autodomains, clustering
from ddk.data.autodomains import DomainPlan, cluster_name, distinctive_terms, reservoir_add
from ddk.data.dedup import text_hash
from ddk.data.embed import EmbedModel
from ddk.data.prepare import prepare
from ddk.data.sources import discover
from ddk.demo.corpora import Shape, build_corpus
from ddk.errors import DDKError
from ddk.preflight import preflight
from tests.conftest import one_error_line

ENGLISH = [
    "the",
    "a",
    "river",
    "town",
    "people",
    "walked",
    "along",
    "quiet",
    "morning",
    "light",
    "over",
    "old",
    "bridge",
    "children",
    "played",
    "near",
    "water",
    "while",
    "their",
    "parents",
    "talked",
    "about",
    "harvest",
    "weather",
    "and",
    "market",
]
GERMAN = [
    "der",
    "die",
    "das",
    "und",
    "ist",
    "nicht",
    "mit",
    "einem",
    "auf",
    "dem",
    "wir",
    "haben",
    "heute",
    "morgen",
    "sehr",
    "schön",
    "weil",
    "unser",
    "haus",
    "neben",
    "kleinen",
    "wald",
    "steht",
    "immer",
    "wieder",
    "gerne",
]
IDENTS = ["self", "value", "items", "result", "count", "name", "data", "node", "key"]


def _doc(source: str, rng: random.Random) -> str:
    if source == "code":
        lines = []
        for j in range(rng.randint(2, 5)):
            a, b = rng.sample(IDENTS, 2)
            lines.append(f"def get_{a}_{j}(self, {b}):\n    return self.{a} + {b}")
        return "\n\n".join(lines) + "\n"
    if source == "numbers":
        rows = [
            ", ".join(f"{rng.uniform(0, 999):.2f}" for _ in range(6))
            for _ in range(rng.randint(3, 8))
        ]
        return "\n".join(rows)
    words = ENGLISH if source == "prose" else GERMAN
    return " ".join(rng.choice(words) for _ in range(rng.randint(25, 60))) + "."


SOURCES = ("code", "prose", "numbers", "german")


def write_unlabelled(path: Path, per_source: int, seed: int = 0) -> list[str]:
    """One JSONL file without a domain field; returns the true source of each line."""
    rng = random.Random(seed)
    items = [(s, _doc(s, rng)) for s in SOURCES for _ in range(per_source)]
    rng.shuffle(items)
    with open(path, "w") as fh:
        for _, text in items:
            fh.write(json.dumps({"text": text}) + "\n")
    return [s for s, _ in items]


def _cfg(inp, out, **kw) -> PrepareSection:
    base = dict(input=str(inp), output=str(out), seq_len=16, val_sequences=2, cluster_sample=400)
    return PrepareSection(**{**base, **kw})


def _assigned(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "assignments.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    truth = write_unlabelled(root / "corpus.jsonl", per_source=50)
    return root / "corpus.jsonl", truth


@pytest.fixture(scope="module")
def auto4(tmp_path_factory, mixed, tokenizer_dir):
    out = tmp_path_factory.mktemp("auto4") / "data"
    manifest = prepare(_cfg(mixed[0], out, auto_domains=4), str(tokenizer_dir), progress=False)
    return out, manifest


def test_clusters_recover_hidden_sources(auto4, mixed):
    out, manifest = auto4
    _, truth = mixed
    rows = _assigned(out)
    assert [r["record"] for r in rows] == list(range(len(truth)))
    assert all(r["source"] == str(mixed[0]) for r in rows)
    ari = adjusted_rand_score(truth, [r["domain"] for r in rows])
    assert ari >= 0.8, ari
    names = list(manifest["domains"])
    assert len(names) == 4 and len(set(names)) == 4
    assert sorted(n.split("_")[0] for n in names) == ["c0", "c1", "c2", "c3"]
    assert all(manifest["domains"][n]["folder"] == n for n in names)  # already folder-safe
    clusters = json.loads((out / "clusters.json").read_text())["clusters"]
    assert set(clusters) == set(names)
    assert sum(c["documents"] for c in clusters.values()) == len(truth)
    for name, c in clusters.items():
        assert c["documents"] == manifest["domains"][name]["documents"]
        assert 1 <= len(c["examples"]) <= 3
    # The code cluster is named by code words, the German one by German words.
    code = max(
        names, key=lambda n: sum(r["domain"] == n and t == "code" for r, t in zip(rows, truth))
    )
    assert set(clusters[code]["top_terms"]) & {"def", "return", "self", "get"}
    # Code is named by its language, the cluster of numbers (no words) by its characters.
    assert code.endswith("_code_python") and clusters[code]["named_by"] == {"code": "python"}
    numbers = max(
        names, key=lambda n: sum(r["domain"] == n and t == "numbers" for r, t in zip(rows, truth))
    )
    assert numbers.endswith("_numbers")


def test_output_passes_preflight(auto4, student_dir, teacher_dir):
    out, _ = auto4
    cfg = Config()
    cfg.data.prepared = str(out)
    cfg.model.student = str(student_dir)
    cfg.model.teacher = str(teacher_dir)
    preflight(cfg)  # raises on any problem


def test_deterministic_for_a_seed(tmp_path, mixed, tokenizer_dir, auto4):
    out = tmp_path / "again"
    prepare(_cfg(mixed[0], out, auto_domains=4), str(tokenizer_dir), progress=False)
    assert (out / "assignments.jsonl").read_text() == (auto4[0] / "assignments.jsonl").read_text()
    assert (out / "clusters.json").read_text() == (auto4[0] / "clusters.json").read_text()


def test_memory_bounded_streaming(tmp_path, monkeypatch):
    """A corpus 10x the fitting sample streams through holding one assignment batch at most."""
    truth = write_unlabelled(tmp_path / "big.jsonl", per_source=100, seed=1)  # 400 documents
    monkeypatch.setattr(autodomains, "ASSIGN_BATCH", 16)
    cfg = _cfg(tmp_path / "big.jsonl", tmp_path / "out", auto_domains=4, cluster_sample=40)
    plan = DomainPlan(cfg, discover(cfg.input), EmbedModel(None, False), progress=False)
    assert sum(plan.models[None].sample_sizes) == 40  # fitted on the sample only
    n = sum(1 for _, text, _ in plan.documents(tmp_path) if text is not None)
    assert n == len(truth) == 10 * cfg.cluster_sample
    assert plan.max_held <= 16
    rows = _assigned(tmp_path)
    assert adjusted_rand_score(truth, [r["domain"] for r in rows]) >= 0.8


def test_auto_picks_the_number_of_sources(tmp_path, mixed):
    cfg = _cfg(mixed[0], tmp_path / "out", auto_domains="auto", auto_domains_range=(2, 7))
    plan = DomainPlan(cfg, discover(cfg.input), EmbedModel(None, False), progress=False)
    model = plan.models[None]
    assert set(model.auto["closest_pair_by_n"]) == {str(n) for n in range(2, 8)}
    assert model.auto["picked"] == len(model.names) == 4


def test_split_domains(tmp_path, tokenizer_dir):
    """Coarse labels ('text', 'data') each hide two sources; split into 2 sub-domains each."""
    rng = random.Random(3)
    truth = []
    with open(tmp_path / "c.jsonl", "w") as fh:
        for coarse, sources in (("text", ("prose", "german")), ("data", ("code", "numbers"))):
            for s in sources:
                for _ in range(30):
                    fh.write(json.dumps({"text": _doc(s, rng), "domain": coarse}) + "\n")
                    truth.append(s)
    out = tmp_path / "out"
    manifest = prepare(
        _cfg(tmp_path / "c.jsonl", out, split_domains=2), str(tokenizer_dir), progress=False
    )
    names = sorted(manifest["domains"])
    assert len(names) == 4
    assert sum(n.startswith("text.c") for n in names) == 2
    assert sum(n.startswith("data.c") for n in names) == 2
    rows = _assigned(out)
    assert adjusted_rand_score(truth, [r["domain"] for r in rows]) >= 0.8


def test_exclude_heldout_drops_the_labelled_folders_val_documents(
    tmp_path, corpus, prepared_dir, tokenizer_dir
):
    root, docs = corpus
    out = tmp_path / "auto"
    manifest = prepare(
        _cfg(root, out, auto_domains=3, exclude_heldout=str(prepared_dir)),
        str(tokenizer_dir),
        progress=False,
    )
    labelled = json.loads((prepared_dir / "manifest.json").read_text())
    held = sum(d["val_documents"] for d in labelled["domains"].values())
    hashes = autodomains.heldout_hashes(prepared_dir)
    # Duplicated texts share a hash, so every copy of a held-out text is dropped.
    all_texts = [t for texts in docs.values() for t in texts]
    dropped = sum(text_hash(t) in hashes for t in all_texts)
    assert held > 0 and dropped >= held
    assert manifest["auto_domains"]["excluded_heldout_documents"] == dropped
    kept = sum(d["documents"] for d in manifest["domains"].values())
    assert kept == len(all_texts) - dropped


def test_pure_helpers_against_naive_references():
    rng = np.random.default_rng(0)
    hits = np.zeros(20)
    for _ in range(3000):
        sample: list[int] = []
        for i in range(20):
            reservoir_add(sample, i, i, 5, rng)
        hits[sample] += 1
    assert np.allclose(hits / 3000, 5 / 20, atol=0.04)  # every item kept with p = k/n

    w = rng.random((3, 6))
    got = distinctive_terms(w, list("abcdef"), 2)
    for c in range(3):
        margin = {
            t: w[c, j] - np.mean([w[o, j] for o in range(3) if o != c])
            for j, t in enumerate("abcdef")
        }
        want = [t for t in sorted(margin, key=lambda t: -margin[t])[:2] if margin[t] > 0]
        assert got[c] == want


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--auto-domains", "1"], "at least 2"),
        (["--auto-domains", "500"], "distinct documents"),
        (["--auto-domains", "3", "--split-domains", "2"], "exclude each other"),
    ],
)
def test_user_errors_are_one_line(tmp_path, mixed, tokenizer_dir, capsys, flags, message):
    out = tmp_path / "out"
    argv = ["prepare", "--input", str(mixed[0]), "--output", str(out)]
    argv += ["--tokenizer", str(tokenizer_dir), "--seq-len", "16", "--val-sequences", "2"]
    assert main(argv + flags) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_student_embedder_clusters_with_the_students_hidden_states(tmp_path, mixed, student_dir):
    cfg = _cfg(mixed[0], tmp_path / "out", auto_domains=4, embedder="student")
    plan = DomainPlan(cfg, discover(cfg.input), EmbedModel(str(student_dir), False), progress=False)
    model = plan.models[None]
    rows = model.embedder.transform(["def f(self):\n    return 1", "der die das und"])
    assert rows.shape == (2, 32) and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert 2 <= len(model.names) <= 4 and sum(model.sample_sizes) == len(mixed[1])


def test_student_embedder_needs_a_model(tmp_path, mixed):
    cfg = _cfg(mixed[0], tmp_path / "out", auto_domains=4, embedder="student")
    with pytest.raises(DDKError, match="needs a model"):
        DomainPlan(cfg, discover(cfg.input), EmbedModel(None, False), progress=False)


def test_tiny_clusters_merge_into_the_most_similar_kept_one():
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    labels = np.array([0] * 5 + [1] * 5 + [2] * 2 + [3])  # clusters 2 and 3 are too small
    mapping = autodomains._merge_tiny(labels, centroids)
    assert mapping.tolist() == [0, 1, 0, 1]


def test_a_different_clustering_is_a_different_corpus(tmp_path, mixed, tokenizer_dir, auto4):
    """Re-running with another N must not pass for 'already prepared'."""
    out, _ = auto4
    with pytest.raises(DDKError, match="different prepared corpus"):
        prepare(_cfg(mixed[0], out, auto_domains=3), str(tokenizer_dir), progress=False)
    again = prepare(_cfg(mixed[0], out, auto_domains=4), str(tokenizer_dir), progress=False)
    assert len(again["domains"]) == 4  # the same settings: nothing to do


@pytest.mark.parametrize("fmt", ["parquet", "hf_dataset"])
def test_unlabelled_parquet_and_datasets_need_no_domain_column(tmp_path, mixed, fmt):
    texts = [json.loads(line)["text"] for line in mixed[0].read_text().splitlines()]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        inp = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": texts}), inp)
    else:
        datasets = pytest.importorskip("datasets")

        inp = tmp_path / "ds"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(inp))
    cfg = _cfg(inp, tmp_path / "out", auto_domains=4)
    plan = DomainPlan(cfg, discover(cfg.input), EmbedModel(None, False), progress=False)
    labels = [d for d, text, _ in plan.documents(tmp_path) if text is not None]
    assert adjusted_rand_score(mixed[1], labels) >= 0.8


def test_cli_student_embedder_uses_model_student(tmp_path, mixed, tokenizer_dir, student_dir):
    out = tmp_path / "out"
    argv = ["prepare", "--input", str(mixed[0]), "--output", str(out), "--tokenizer"]
    argv += [str(tokenizer_dir), "--seq-len", "16", "--val-sequences", "2", "--auto-domains", "2"]
    argv += ["--embedder", "student", "--set", f"model.student={student_dir}"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["auto_domains"]["embedder"] == "student"
    assert manifest["fingerprint"]["embed_model"] == str(student_dir)
    assert len(manifest["domains"]) == 2


def _read_folders(root: Path, path: Path) -> list[str]:
    """The documents of a corpus folder (one sub-folder per true domain), shuffled, written to
    `path` as one unlabelled JSONL; returns each line's true domain."""
    items = [
        (f.parent.name, json.loads(line)["text"])
        for f in sorted(root.glob("*/*.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
    ]
    random.Random(0).shuffle(items)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in items))
    return [d for d, _ in items]


def _recall_purity(truth: list[str], labels: list[str]) -> dict[str, tuple[float, float]]:
    """Per true domain: the share of its documents in its biggest cluster, and that cluster's
    share of the domain."""
    out = {}
    for d in set(truth):
        mine = [lab for t, lab in zip(truth, labels) if t == d]
        best = max(set(mine), key=mine.count)
        in_best = [t for t, lab in zip(truth, labels) if lab == best]
        out[d] = (mine.count(best) / len(mine), in_best.count(d) / len(in_best))
    return out


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    """One domain of 85 % (word problems from templates, which split easily), two of ~6 %
    (English docstrings, Han-script prose) and one of 2 % (Python code): sources every Python
    install has."""
    root = tmp_path_factory.mktemp("unbalanced")
    shape = Shape("test", {"math": 1700, "prose": 120, "han": 120, "python": 40})
    build_corpus(shape, root / "corpus", seed=0, log=lambda msg: None)
    truth = _read_folders(root / "corpus", root / "unlabelled.jsonl")
    return root / "unlabelled.jsonl", truth


@pytest.mark.parametrize("n", [4, "auto"])
def test_small_distinct_domains_are_found_not_the_big_one_split(tmp_path, unbalanced, n):
    """Before: k-means with 4 centroids split the word problems in three and merged code into
    prose (ARI 0.14; the Han cluster named a bare `c3`), and `auto` picked 16 domains."""
    path, truth = unbalanced
    cfg = _cfg(path, tmp_path / "out", auto_domains=n, cluster_sample=len(truth))
    plan = DomainPlan(cfg, discover(cfg.input), None, progress=False)
    labels = [d for d, text, _ in plan.documents(tmp_path) if text is not None]
    assert adjusted_rand_score(truth, labels) >= 0.9
    for domain, (recall, purity) in _recall_purity(truth, labels).items():
        assert recall >= 0.8 and purity >= 0.8, (domain, recall, purity)
    names = plan.models[None].names
    assert len(names) == 4
    assert any(name.endswith("_code_python") for name in names), names
    assert any(name.endswith("_han") for name in names), names
    if n == "auto":
        assert plan.models[None].auto["picked"] == 4


def test_auto_on_one_domain_says_so_in_one_line(tmp_path, tokenizer_dir, capsys):
    build_corpus(Shape("one", {"math": 400}), tmp_path / "corpus", log=lambda msg: None)
    out = tmp_path / "out"
    argv = ["prepare", "--input", str(tmp_path / "corpus"), "--output", str(out)]
    argv += ["--tokenizer", str(tokenizer_dir), "--seq-len", "16", "--val-sequences", "2"]
    assert main(argv + ["--auto-domains", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the corpus looks like one domain"), err
    assert not out.exists()


@pytest.mark.parametrize(
    "texts, message",
    [
        (["the same text"] * 30, "all the same text"),  # issue 16: a RuntimeWarning came first
        ([f"document {i} words" for i in range(30)], "looks like one domain"),  # one shape
    ],
)
def test_auto_errors_print_no_warning_first(tmp_path, tokenizer_dir, texts, message):
    """stderr holds the one-line error and nothing else (sklearn divided by a zero variance)."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = ["prepare", "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "out")]
    argv += ["--tokenizer", str(tokenizer_dir), "--seq-len", "16", "--auto-domains", "auto"]
    done = subprocess.run(
        [sys.executable, "-m", "ddk.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def _naive_ward(means, sizes, exponent):
    """Tempered Ward from scratch: every step recomputes each group's mean from its pieces."""
    groups = [[i] for i in range(len(means))]
    steps = []
    while len(groups) > 1:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                sa, sb = sizes[groups[a]].sum(), sizes[groups[b]].sum()
                ma = (means[groups[a]] * sizes[groups[a], None]).sum(0) / sa
                mb = (means[groups[b]] * sizes[groups[b], None]).sum(0) / sb
                cost = (sa * sb / (sa + sb)) ** exponent * ((ma - mb) ** 2).sum()
                if best is None or cost < best[0]:
                    best = (cost, a, b)
        cost, a, b = best
        steps.append((frozenset(groups[a] + groups[b]), cost))
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return steps


@pytest.mark.parametrize("exponent", [1.0, clustering.SIZE_EXPONENT])
def test_ward_tree_and_cut_against_a_naive_reference(exponent):
    rng = np.random.default_rng(0)
    means, sizes = rng.normal(size=(12, 5)), rng.uniform(1, 50, size=12)
    merges = clustering.ward_tree(means, sizes, np.ones(12, dtype=int), exponent)
    members = {i: {i} for i in range(12)}
    for step, m in enumerate(merges):
        members[12 + step] = members[m.left] | members[m.right]
    got = [(frozenset(members[12 + s]), m.cost) for s, m in enumerate(merges)]
    want = _naive_ward(means, sizes, exponent)
    assert [g for g, _ in got] == [w for w, _ in want]
    assert np.allclose([c for _, c in got], [c for _, c in want])
    for n in (1, 3, 12):
        labels = clustering.cut_tree(merges, 12, n)
        assert len(set(labels.tolist())) == n and labels[0] == 0
        # Each cluster is one node of the tree (or a piece): the groups the first 12-n steps made.
        groups = {frozenset(np.flatnonzero(labels == c).tolist()) for c in range(n)}
        made = [g for g, _ in want[: 12 - n]]
        for g in groups:
            assert len(g) == 1 or g in made


def test_cluster_names_keep_accented_letters():
    # Before: "über" named a cluster "c1_ber".
    assert cluster_name(1, ["über", "café", "日本", "def"]) == "c1_uber_cafe_def"
    assert cluster_name(0, []) == "c0"


def test_a_cluster_too_small_to_hold_out_suggests_fewer_domains(tmp_path, tokenizer_dir):
    # Before: the hint named only text and seq_len, not the N that made the cluster small.
    import json
    import random

    from ddk.config import PrepareSection
    from ddk.data.prepare import prepare

    r = random.Random(0)
    words = [
        "the",
        "river",
        "town",
        "people",
        "walked",
        "along",
        "quiet",
        "morning",
        "light",
        "over",
        "old",
        "bridge",
    ]
    lines = [{"text": " ".join(r.choice(words) for _ in range(60))} for _ in range(40)]
    # the numbers cluster: three long documents, of which half the tokens hold out only one
    lines += [{"text": ", ".join(str(r.randint(0, 99999)) for _ in range(300))} for _ in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = PrepareSection(
        input=str(tmp_path / "c.jsonl"),
        output=str(tmp_path / "out"),
        seq_len=32,
        val_sequences=2,
        auto_domains=2,
    )
    with pytest.raises(DDKError, match=r"too little text.*ask for fewer domains"):
        prepare(cfg, str(tokenizer_dir), progress=False)
    assert not (tmp_path / "out").exists()
