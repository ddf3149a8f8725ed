import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ddk.cli import main
from ddk.data.dataset import PreparedData


def _naive_windows(data, domain, split="test") -> list[torch.Tensor]:
    """Each held-out document's stored tokens cut every seq_len tokens (one token shared), read
    from the split's files directly: the reference for what a held-out window is."""
    shard = data.domains[domain]
    L = data.seq_len
    tokens = np.fromfile(shard.folder / f"{split}.bin", dtype=np.uint16).astype(np.int64)
    out, pos = [], 0
    for _, n in np.load(shard.folder / f"{split}_docs.npy").tolist():
        piece = torch.from_numpy(tokens[pos : pos + n])
        out += [piece[j : j + L + 1] for j in range(0, n - 1, L)]
        pos += n
    return out


def _naive_ppl(model, data, domain, split="test"):
    """exp(mean CE) from the model's own full logits, one unpadded window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in _naive_windows(data, domain, split):
            logits = model(input_ids=s[None, :-1]).logits[0]
            total += F.cross_entropy(logits.double(), s[1:], reduction="sum").item()
            count += len(s) - 1
    return math.exp(total / count), count


def test_eval_json_matches_naive_perplexity(student_dir, prepared_dir, capsys):
    assert main(["eval", "--model", str(student_dir), "--data", str(prepared_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test"  # the default: reporting never uses what DDK steered by
    data = PreparedData(prepared_dir)
    assert set(result["domains"]) == set(data.names)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    for domain, r in result["domains"].items():
        ppl, tokens = _naive_ppl(model, data, domain)
        assert r["tokens"] == tokens
        assert math.isclose(r["ppl"], math.exp(r["loss"]), rel_tol=1e-9)
        assert math.isclose(r["ppl"], ppl, rel_tol=1e-4)


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
