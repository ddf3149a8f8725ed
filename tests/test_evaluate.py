import json
import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ddk.cli import main
from ddk.data.dataset import PreparedData


def _naive_ppl(model, data, domain, split="test"):
    """exp(mean CE) from the model's own full logits, one sequence at a time."""
    shard = data.domains[domain]
    seqs = shard.sequences(split, range(shard.num_sequences(split)))
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model(input_ids=s[None, :-1]).logits[0]
            total += F.cross_entropy(logits.double(), s[1:], reduction="sum").item()
            count += len(s) - 1
    return math.exp(total / count)


def test_eval_json_matches_naive_perplexity(student_dir, prepared_dir, capsys):
    assert main(["eval", "--model", str(student_dir), "--data", str(prepared_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test"  # the default: reporting never uses what DDK steered by
    data = PreparedData(prepared_dir)
    assert set(result["domains"]) == set(data.names)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    for domain, r in result["domains"].items():
        assert r["tokens"] == 4 * 32
        assert math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-9)
        assert math.isclose(r["ppl"], _naive_ppl(model, data, domain), rel_tol=1e-4)


def test_eval_table_and_domain_subset(student_dir, prepared_dir, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                str(student_dir),
                "--data",
                str(prepared_dir),
                "--domains",
                "math",
                "code",
                "--max-sequences",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "math" in out and "code" in out and "prose" not in out
    assert "geometric mean" in out
