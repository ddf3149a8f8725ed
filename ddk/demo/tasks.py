"""The demo's benchmarks: one small lm-eval task per domain, built from its held-out TEST documents.

Each item cuts a test document after a line (code, CSV records), a sentence (prose, math) or a
JSON field (records) and asks for the true continuation among four: the next unit of the same
document and three units of other test documents of the same domain. lm-eval scores it as a
multiple-choice task. The primary metric is `acc_mutual_info`: each choice's log-likelihood
given the document minus its log-likelihood alone, so a choice does not win for being short or
generic but for fitting what came before; `acc` and `acc_norm` are recorded too.

Why not exact-match answers for the generated math and records: models of the demo's size
(about a million parameters) generate almost none of them exactly, so exact match cannot rank
the students; likelihood comparisons can.

The test documents are the ones `ddk prepare` held out for reporting (`<domain>/test_docs.npy`
lists their corpus ids): nothing trained on them or steered by them. Each task is an lm-eval
YAML over a local JSONL file in one folder, scored like any user task (`eval.include_path`).
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import numpy as np
import yaml

from ddk.data.dedup import text_hash
from ddk.data.manifest import read_manifest
from ddk.data.sources import discover, iter_documents
from ddk.errors import DDKError
from ddk.models import load_tokenizer

MAX_ITEMS_PER_DOC = 8
CHOICES = 4
MIN_UNIT_CHARS = 8  # shorter units ("    }", "else:") say too little to tell apart
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_JSON_FIELD = ', "'


def split_units(domain: str, text: str) -> tuple[list[str], str]:
    """A document's units and the string that joins them back: sentences for prose and math,
    fields for a one-line JSON record, lines otherwise (code, CSV tables)."""
    if domain in ("prose", "math"):
        return [s for s in _SENTENCE_END.split(text.strip()) if s], " "
    if "\n" not in text and text.startswith("{") and _JSON_FIELD in text:
        first, *rest = text.split(_JSON_FIELD)
        return [first, *('"' + r for r in rest)], ", "
    return text.split("\n"), "\n"


def continuation_items(
    units: list[str], joiner: str, pool: list[str], fits, rng: random.Random
) -> list[dict]:
    """Cut one document at up to MAX_ITEMS_PER_DOC units that `fits`: the units before -> the
    true next unit among CHOICES, the others drawn from `pool` (other documents' units)."""
    cuts = [k for k in range(1, len(units)) if fits(units[k])]
    rng.shuffle(cuts)
    items = []
    for k in sorted(cuts[:MAX_ITEMS_PER_DOC]):
        true = units[k]
        others = sorted({u for u in pool if u.strip() != true.strip()})
        if len(others) < CHOICES - 1:
            continue
        choices = [true, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        items.append(
            {
                "context": joiner.join(units[:k]) + joiner,
                "choices": choices,
                "label": choices.index(true),
            }
        )
    return items


def task_yaml(name: str, data: Path) -> dict:
    """lm-eval's multiple-choice task over a local JSONL file."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            "cache_dir": str(data.parent / ".datasets-cache"),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",  # the context ends with its own joiner
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc_mutual_info", "acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }


def heldout_test_documents(prepared: Path, corpus: Path) -> dict[str, list[str]]:
    """{domain: texts of its test documents}, by the corpus ids `ddk prepare` recorded in
    `<domain>/test_docs.npy`; each text is checked against the folder's held-out hashes."""
    manifest = read_manifest(prepared)
    ids = {
        domain: np.load(prepared / info.folder / "test_docs.npy")[:, 0].tolist()
        for domain, info in manifest.domains.items()
    }
    wanted = {i for domain_ids in ids.values() for i in domain_ids}
    texts: dict[int, str] = {}
    doc_id = 0
    # ddk.data.prepare's numbering: corpus order, documents that are only whitespace skipped.
    for _, text, _ in iter_documents(
        discover(corpus), manifest.text_field or "text", manifest.domain_field
    ):
        if text is None or not text.strip():
            continue
        if doc_id in wanted:
            texts[doc_id] = text
        doc_id += 1
    out: dict[str, list[str]] = {}
    for domain, info in manifest.domains.items():
        held = np.load(prepared / info.folder / "heldout_hashes.npy")
        out[domain] = []
        for i in ids[domain]:
            text = texts.get(i)
            if text is None or not np.isin(np.uint64(text_hash(text)), held):
                raise DDKError(
                    f"'{corpus}' is not the corpus '{prepared}' was prepared from (test document "
                    f"{i} of '{domain}' is not there); give the corpus it was prepared from"
                )
            out[domain].append(text)
    return out


def write_demo_tasks(
    prepared: Path, corpus: Path, out: Path, seed: int = 0
) -> dict[str, list[str]]:
    """Write one task per domain of the prepared data (`demo_<domain>_continuation`: YAML +
    JSONL in `out`); returns the `eval.tasks` map {domain: [task]}. A unit may take at most half
    of the data's seq_len in tokens, so every choice fits the demo models' context with some of
    the document before it."""
    prepared, corpus = Path(prepared), Path(corpus)
    manifest = read_manifest(prepared)
    tokenizer = load_tokenizer(manifest.tokenizer.name_or_path, trust_remote_code=False)
    max_tokens = manifest.seq_len // 2

    @functools.cache
    def fits(unit: str) -> bool:
        return len(unit.strip()) >= MIN_UNIT_CHARS and len(tokenizer(unit).input_ids) <= max_tokens

    docs = heldout_test_documents(prepared, corpus)
    out.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for domain, texts in docs.items():
        name = f"demo_{re.sub(r'[^0-9A-Za-z_]', '_', domain)}_continuation"
        rng = random.Random(f"{seed}:{name}")
        split = [split_units(domain, t) for t in texts]
        items = []
        for i, (units, joiner) in enumerate(split):
            pool = [u for j, (other, _) in enumerate(split) if j != i for u in other if fits(u)]
            items += continuation_items(units, joiner, pool, fits, rng)
        if not items:
            raise DDKError(f"no {name} items could be built from the {domain} test documents")
        data = (out / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
        (out / f"{name}.yaml").write_text(
            yaml.safe_dump(task_yaml(name, data), sort_keys=False, allow_unicode=True)
        )
        tasks[domain] = [name]
    return tasks
