"""Checks of a run's config, data and models before any weights load or any step runs.

Every problem is collected and reported at once, each with its YAML path, so a user fixes them
in one edit instead of one failed launch per typo. Only cheap things are read: the prepared
manifest, the model configs and tokenizers.
"""

from __future__ import annotations

from pathlib import Path

from ddk.config import Config
from ddk.errors import DDKError, first_line


def _load_quietly(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except DDKError as e:
        return None, str(e)


def _model_config(name: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from ddk.models import resolve_local_path

    path = resolve_local_path(name, "model")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DDKError(f"cannot load '{name}': {first_line(e)}") from None


def preflight(cfg: Config) -> None:
    """Raise one DDKError listing every problem found (empty list: the run may start)."""
    problems = preflight_problems(cfg)
    if problems:
        raise DDKError(f"{len(problems)} problem(s): " + "; ".join(problems))


def load_checked_config(path, overrides: list[str]) -> Config:
    """load_config, but a schema error does not hide the data and model problems: the invalid
    keys fall back to their defaults, the rest is checked too, and one DDKError lists all."""
    from pydantic import ValidationError

    from ddk.config import ConfigError, load_config, read_raw_config

    try:
        return load_config(path, overrides)
    except ConfigError:
        raw = read_raw_config(path, overrides)  # re-raises what stops before validation
        try:
            Config.model_validate(raw)
        except ValidationError as err:
            schema = schema_problems(err, str(path) if path else "config")
            usable = _drop_invalid(raw)
            problems = schema + (preflight_problems(usable) if usable is not None else [])
            raise DDKError(f"{len(problems)} problem(s): " + "; ".join(problems)) from None
        raise


def schema_problems(err, source: str) -> list[str]:
    from ddk.config import validation_problems

    return [f"{source}: {problem}" for problem in validation_problems(err)]


def _drop_invalid(raw: dict, rounds: int = 10) -> Config | None:
    """The config with every invalid key removed (so its default applies), or None."""
    import copy

    from pydantic import ValidationError

    data = copy.deepcopy(raw)
    for _ in range(rounds):
        try:
            return Config.model_validate(data)
        except ValidationError as err:
            # Decide every removal before making any: one bad value can raise several errors
            # (one per union branch), and a later one must not climb to the whole section.
            targets = {_deepest_key(data, [str(p) for p in e["loc"]]) for e in err.errors()}
            for path in sorted(targets - {()}, key=len, reverse=True):
                parent = data
                for part in path[:-1]:
                    parent = parent.get(part, {})
                parent.pop(path[-1], None)
    return None


def _deepest_key(data: dict, loc: list[str]) -> tuple[str, ...]:
    """The deepest mapping key on `loc` that exists (a list item or a union's type tag in the
    location selects the whole value that holds it)."""
    if not loc:  # a cross-field rule (min_lr > lr): the dependent key
        loc = ["trainer", "min_lr"]
    path, node = [], data
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        path.append(part)
        node = node[part]
    return tuple(path)


def _teacher_on_disk(cfg: Config) -> bool:
    from ddk.teacher.cache import teacher_on_disk

    return teacher_on_disk(cfg.model.teacher)


def preflight_problems(cfg: Config) -> list[str]:
    """Every config/data/model problem found, each a short phrase naming its YAML path."""
    from ddk.data.manifest import read_manifest
    from ddk.data.vocab import same_vocabulary
    from ddk.methods import method_spec
    from ddk.models import check_tokenizers_match, load_tokenizer

    problems: list[str] = []
    method = cfg.distill.method

    manifest = None
    if not cfg.data.prepared:
        problems.append("data.prepared: required (the output folder of `ddk prepare`)")
    elif not Path(cfg.data.prepared).expanduser().exists():
        problems.append(f"data.prepared: '{cfg.data.prepared}' does not exist; run `ddk prepare`")
    else:
        manifest, err = _load_quietly(read_manifest, Path(cfg.data.prepared).expanduser())
        if err:
            problems.append(f"data.prepared: {err}")
    domains = list(manifest.domains) if manifest else []
    if cfg.data.domains is not None and not cfg.data.domains:
        problems.append("data.domains: empty; list domains to train on or leave it out for all")
    if manifest and cfg.data.domains is not None:
        for d in cfg.data.domains:
            if d not in manifest.domains:
                problems.append(
                    f"data.domains: '{d}' is not in the prepared data ({', '.join(domains)})"
                )
        domains = [d for d in cfg.data.domains if d in manifest.domains]
    mixture = cfg.distill.mixture
    if isinstance(mixture, dict) and method_spec(method).fixed_mixture:
        if manifest:
            for d in mixture:
                if d not in domains:
                    problems.append(
                        f"distill.mixture: '{d}' is not a domain of the run ({', '.join(domains)})"
                    )
        if any(not v >= 0 for v in mixture.values()):  # catches NaN too
            problems.append("distill.mixture: weights must be >= 0")
        elif not any(v > 0 for d, v in mixture.items() if not manifest or d in domains):
            problems.append(
                "distill.mixture: every weight is 0; give at least one domain a positive weight"
            )

    tokenizers, configs = {}, {}
    roles = [("student", cfg.model.student)]
    offline = cfg.teacher.mode == "offline"
    if cfg.model.teacher and offline and method != "cpt" and not _teacher_on_disk(cfg):
        # The cache stands in for the teacher, so the training machine need not hold it.
        print(
            f"warning: teacher '{cfg.model.teacher}' is not on this machine; the offline cache "
            "is checked against its name only"
        )
    elif cfg.model.teacher:
        roles.append(("teacher", cfg.model.teacher))
    elif method != "cpt" and not offline:
        problems.append(f"model.teacher: required for distill.method '{method}'")
    if not cfg.model.student:
        problems.append("model.student: required (a hub id or a local folder)")
        roles = roles[1:]
    for role, name in roles:
        model_cfg, err = _load_quietly(_model_config, name, cfg.model.trust_remote_code)
        if err:
            problems.append(f"model.{role}: {err}")
            continue
        configs[role] = model_cfg
        tok, err = _load_quietly(load_tokenizer, name, cfg.model.trust_remote_code)
        if tok is not None:
            tokenizers[role] = tok
        elif role == "student":
            problems.append(f"model.student: {err}")
        else:
            print(
                f"warning: no tokenizer in teacher '{name}' ({err}); only its output size is checked"
            )

    if manifest:
        seq_len = manifest.seq_len
        for role, model_cfg in configs.items():
            limit = getattr(model_cfg, "max_position_embeddings", None)
            if limit is not None and seq_len > limit:
                problems.append(
                    f"data.prepared: seq_len {seq_len} exceeds the {role}'s context of {limit} "
                    "tokens; prepare the data with a smaller prepare.seq_len"
                )
        student_tok = tokenizers.get("student")
        if student_tok is not None and not same_vocabulary(manifest, student_tok):
            problems.append(
                f"data.prepared: tokenised with '{manifest.tokenizer.name_or_path}', whose "
                f"vocabulary differs from the student's ('{cfg.model.student}'); prepare the data "
                "with the student's tokenizer"
            )
        vocab = manifest.tokenizer.vocab_size
        for role, model_cfg in configs.items():
            rows = getattr(model_cfg, "vocab_size", None)
            if rows is not None and rows < vocab:
                problems.append(
                    f"model.{role}: vocabulary mismatch: its output layer has {rows} rows but the "
                    f"tokenizer has {vocab} tokens"
                )
    if "student" in tokenizers and "teacher" in tokenizers:
        _, err = _load_quietly(
            check_tokenizers_match,
            tokenizers["teacher"],
            tokenizers["student"],
            cfg.model.teacher,
            cfg.model.student,
        )
        if err:
            problems.append(f"model.teacher: {err}")
    if offline and method != "cpt":
        from ddk.teacher.cache import cache_problems

        problems.extend(cache_problems(cfg, manifest, domains))
    if cfg.eval.tasks:
        from ddk.harness import BenchmarkPlan, plan_problems

        plan = BenchmarkPlan.from_section(cfg.eval)
        problems.extend(plan_problems(plan, domains if manifest else None))
    return problems
