"""`ddk demo --chat`: a chat corpus from the demo's own generators, and a tokenizer that ships a
chat template.

    out_dir/math/chat.jsonl      math Q&A: a word problem, its worked answer (1-2 turns)
    out_dir/code/chat.jsonl      code explanation: "what does module.function(args) do?" answered
                                 with the first paragraph of its docstring (standard library)
    out_dir/records/chat.jsonl   record lookup: a person or order record, a question about a
                                 field, the answer read from the record
One JSON object per line, {"messages": [{"role", "content"}, ...]}, as `ddk prepare` reads chat.
The tokenizer is byte-level BPE trained on the conversations, with ChatML special tokens and a
ChatML template whose `{% generation %}` blocks mark the assistant's tokens.
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer

from ddk.demo.build import train_bpe_tokenizer
from ddk.demo.corpus import (
    default_stdlib_dir,
    math_qa,
    order_record,
    person_record,
    stdlib_python_files,
)

CHAT_DOMAINS = ("math", "code", "records")
# Conversations per domain at scale 1; deliberately unequal.
CONVERSATIONS = {"math": 2400, "code": 1600, "records": 2000}
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ m.content }}<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_FILE = "chat.jsonl"


def _turn(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def math_conversations(rng: random.Random) -> Iterator[list[dict]]:
    problems = math_qa(rng)
    while True:
        msgs = [{"role": "system", "content": "Solve step by step."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2))):
            msgs += _turn(*next(problems))
        yield msgs


def _documented_functions(files: list[Path]) -> Iterator[tuple[str, str, str]]:
    """(module.function, signature, first docstring paragraph) of documented top-level
    functions in the standard library."""
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_"):
                first = " ".join(doc.split("\n\n")[0].split())
                if 40 <= len(first) <= 400:
                    yield f"{path.stem}.{node.name}", ast.unparse(node.args), first


def code_conversations(rng: random.Random) -> Iterator[list[dict]]:
    files = stdlib_python_files(default_stdlib_dir())
    rng.shuffle(files)
    for name, args, doc in _documented_functions(files):
        msgs = _turn(f"What does `{name}({args})` do?", doc)
        if rng.random() < 0.3:
            module = name.rsplit(".", 1)[0]
            msgs += _turn("Which module is it in?", f"It is in the `{module}` module.")
        yield msgs


_PERSON_FIELDS = (("email", "email"), ("city", "city"), ("birth_date", "birth date"))


def record_conversations(rng: random.Random) -> Iterator[list[dict]]:
    people: list[str] = []
    orders = 0
    while True:
        if people and rng.random() < 0.5:
            orders += 1
            full = order_record(rng, people, orders)
            rec = {k: full[k] for k in ("order_id", "customer_id", "order_date", "status", "total")}
            question, answer = (
                ("What is the total of this order?", f"The total is {rec['total']}.")
                if rng.random() < 0.5
                else ("What is the status of this order?", f"The order is {rec['status']}.")
            )
        else:
            rec = person_record(rng, people)
            key, label = rng.choice(_PERSON_FIELDS)
            who = f"{rec['first_name']} {rec['last_name']}"
            question, answer = f"What is the {label} of this person?", f"{who}: {rec[key]}."
        yield _turn(f"{json.dumps(rec)}\n{question}", answer)


def build_chat_corpus(out_dir: Path, *, scale: float = 1.0, seed: int = 0) -> dict[str, dict]:
    """Write the chat corpus; {domain: {"conversations", "bytes"}}."""
    makers = {
        "math": math_conversations,
        "code": code_conversations,
        "records": record_conversations,
    }
    stats = {}
    for domain in CHAT_DOMAINS:
        want = max(1, round(CONVERSATIONS[domain] * scale))
        source = makers[domain](random.Random(f"{seed}:chat:{domain}"))
        lines = [json.dumps({"messages": m}) + "\n" for m, _ in zip(source, range(want))]
        (out_dir / domain).mkdir(parents=True, exist_ok=True)
        (out_dir / domain / _FILE).write_text("".join(lines), encoding="utf-8")
        stats[domain] = {"conversations": len(lines), "bytes": sum(map(len, lines))}
    return stats


def train_chat_tokenizer(corpus: Path, vocab: int, out_dir: Path) -> Path:
    """BPE on the conversations' text, plus ChatML special tokens and template."""

    def texts():
        for f in sorted(corpus.glob(f"*/{_FILE}")):
            for line in f.open(encoding="utf-8"):
                for m in json.loads(line)["messages"]:
                    yield f"{m['role']}\n{m['content']}"

    train_bpe_tokenizer(texts(), vocab, out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=False)  # our own tokenizer
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return out_dir
