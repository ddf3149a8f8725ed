"""What `ddk distill --resume` compares (unit level): the keys a run folder may not change."""


def test_protected_differences_match_a_naive_walk():
    from ddk.config import Config
    from ddk.run_dir import SETTABLE_ON_RESUME, protected_differences

    base = Config().model_dump(mode="json")
    changed = Config().model_dump(mode="json")
    edits = {
        ("trainer", "max_steps"): 5,  # settable
        ("trainer", "lr"): 1.0,  # settable
        ("trainer", "output_dir"): "elsewhere",  # where the run lives: never compared
        ("prepare", "seq_len"): 16,  # not part of a distill run
        ("trainer", "seed"): 3,
        ("distill", "K"): 2,
        ("model", "trust_remote_code"): True,
        ("trainer", "warmup_steps"): 9,
        # settable: the trainer itself checks micro x accum x processes is unchanged
        ("trainer", "micro_batch_size"): 9,
    }
    for (section, key), value in edits.items():
        changed[section][key] = value
    naive = sorted(
        f"{s}.{k}"
        for (s, k) in edits
        if f"{s}.{k}" not in SETTABLE_ON_RESUME and k != "output_dir" and s != "prepare"
    )
    assert protected_differences(base, changed) == naive
    assert naive == [
        "distill.K",
        "model.trust_remote_code",
        "trainer.seed",
        "trainer.warmup_steps",
    ]
    del changed["teacher"]  # a section another ddk version did not have
    assert protected_differences(base, changed) == naive
