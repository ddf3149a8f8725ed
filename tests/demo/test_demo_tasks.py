"""The demo's benchmark tasks: built from the prepared data's held-out test documents only, and
scored through lm-eval like any user task."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from ddk.config import PrepareSection
from ddk.data.dedup import normalise_text, text_hash
from ddk.data.manifest import read_manifest
from ddk.data.prepare import prepare
from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpus import build_demo_corpus
from ddk.demo.tasks import (
    CHOICES,
    continuation_items,
    heldout_test_documents,
    split_units,
    write_demo_tasks,
)
from ddk.errors import DDKError


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_tasks")
    corpus = root / "corpus"
    build_demo_corpus(corpus, scale=0.05, seed=0)
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*/*.jsonl")) for line in open(f)]
    tokenizer = train_bpe_tokenizer(texts, 512, root / "tokenizer")
    cfg = PrepareSection(
        input=str(corpus), output=str(root / "prepared"), seq_len=64, val_sequences=6
    )
    prepare(cfg, str(tokenizer), progress=False)
    tasks = write_demo_tasks(root / "prepared", corpus, root / "tasks")
    return root, tasks


def test_one_task_per_domain_from_test_documents_only(demo_data):
    root, tasks = demo_data
    manifest = read_manifest(root / "prepared")
    assert tasks == {d: [f"demo_{d}_continuation"] for d in manifest.domains}
    docs = heldout_test_documents(root / "prepared", root / "corpus")
    for domain, info in manifest.domains.items():
        folder = root / "prepared" / info.folder
        test_ids = np.load(folder / "test_docs.npy")[:, 0]
        assert len(docs[domain]) == len(test_ids) > 0
        held = set(np.load(folder / "heldout_hashes.npy").tolist())
        assert all(text_hash(t) in held for t in docs[domain])
        # every item is the start of one of the domain's test documents plus its true next unit
        starts = [normalise_text(t) for t in docs[domain]]
        items = [json.loads(x) for x in (root / "tasks" / f"{tasks[domain][0]}.jsonl").open()]
        assert len(items) >= len(test_ids)
        for item in items:
            assert len(item["choices"]) == CHOICES == len(set(item["choices"]))
            prefix = normalise_text(item["context"] + item["choices"][item["label"]])
            assert any(s.startswith(prefix) for s in starts), prefix[:80]
        spec = yaml.safe_load((root / "tasks" / f"{tasks[domain][0]}.yaml").read_text())
        assert spec["output_type"] == "multiple_choice"
        assert spec["metric_list"][0]["metric"] == "acc_mutual_info"


def test_scored_through_lm_eval_like_any_user_task(demo_data):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from ddk.demo.build import tiny_causal_lm
    from ddk.harness import BenchmarkPlan, score

    root, tasks = demo_data
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = tiny_causal_lm(len(tok), hidden_size=32, num_heads=2, max_positions=64)
    plan = BenchmarkPlan(
        tasks={t: d for d, names in tasks.items() for t in names},
        include_path=(str(root / "tasks"),),
        limit=4,
    )
    record = score(model, tok, plan)
    assert set(record["domains"]) == set(tasks)
    for name, entry in record["tasks"].items():
        assert entry["metric"] == "acc_mutual_info,none" and entry["samples"] == 4, name
        assert 0.0 <= entry["score"] <= 1.0


def test_another_corpus_is_refused(demo_data, tmp_path):
    root, _ = demo_data
    other = tmp_path / "corpus"
    shutil.copytree(root / "corpus", other)
    math = other / "math" / "part-00000.jsonl"
    lines = math.read_text().splitlines()
    math.write_text("\n".join(json.dumps({"text": f"Q: {i}?"}) for i in range(len(lines))) + "\n")
    with pytest.raises(DDKError, match="is not the corpus"):
        heldout_test_documents(root / "prepared", other)


def test_continuation_items():
    import random

    units, joiner = split_units("prose", "First one here. Second one here! Third one here? Fourth.")
    assert units == ["First one here.", "Second one here!", "Third one here?", "Fourth."]
    pool = ["Other sentence a.", "Other sentence b.", "Other sentence c."]
    items = continuation_items(units, joiner, pool, lambda u: len(u) >= 8, random.Random(0))
    assert [i["choices"][i["label"]] for i in items] == units[1:3]  # "Fourth." is too short
    assert items[0]["context"] == "First one here. "
    assert all(set(i["choices"]) - {i["choices"][i["label"]]} <= set(pool) for i in items)
    fields, comma = split_units("records", '{"id": "P1", "city": "Lyon", "country": "FR"}')
    assert fields == ['{"id": "P1"', '"city": "Lyon"', '"country": "FR"}'] and comma == ", "
    assert comma.join(fields) == '{"id": "P1", "city": "Lyon", "country": "FR"}'
