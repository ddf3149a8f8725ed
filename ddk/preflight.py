"""Checks of a run's config, data and models before any weights load or any step runs.

Every problem is collected and reported at once, each with its YAML path, so a user fixes them
in one edit instead of one failed launch per typo. Only cheap things are read: the prepared
manifest, the model configs and tokenizers.
"""

from __future__ import annotations

import copy
from pathlib import Path

from pydantic import ValidationError
from transformers import AutoConfig

from ddk.config import Config, ConfigError, load_config, read_raw_config, validation_problems
from ddk.data.manifest import read_manifest
from ddk.data.vocab import same_vocabulary
from ddk.errors import DDKError, first_line
from ddk.harness import BenchmarkPlan, plan_problems
from ddk.identity import teacher_on_disk
from ddk.lora import lora_problems
from ddk.methods import method_spec
from ddk.models import (
    check_tokenizers_match,
    load_tokenizer,
    resolve_local_path,
    tokenizer_file_difference,
)
from ddk.ranks import print0
from ddk.teacher.offline import cache_problems
from ddk.teacher.placement import launch_placement_problem, teachers_placement_problem
from ddk.teacher.retokenize import cross_tokenizer_problems


def _load_quietly(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except DDKError as e:
        return None, str(e)


def _model_config(name: str, trust_remote_code: bool):
    path = resolve_local_path(name, "model")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DDKError(f"cannot load '{name}': {first_line(e)}") from None


def preflight(cfg: Config, *, teachers_at_once: bool = True) -> None:
    """Raise one DDKError listing every problem found (empty list: the run may start).
    `teachers_at_once` False: the teachers of `model.teachers` are loaded one after the other
    (`ddk cache-teacher`), so they need not fit the devices together."""
    problems = preflight_problems(cfg, teachers_at_once=teachers_at_once)
    if problems:
        raise DDKError(f"{len(problems)} problem(s): " + "; ".join(problems))


def load_checked_config(path, overrides: list[str]) -> Config:
    """load_config, but a schema error does not hide the data and model problems: the invalid
    keys fall back to their defaults, the rest is checked too, and one DDKError lists all."""
    try:
        return load_config(path, overrides)
    except ConfigError:
        raw = read_raw_config(path, overrides)  # re-raises what stops before validation
        try:
            Config.model_validate(raw)
        except ValidationError as err:
            schema = schema_problems(err, str(path) if path else "config")
            usable = drop_invalid(raw)
            problems = schema + (preflight_problems(usable) if usable is not None else [])
            raise DDKError(f"{len(problems)} problem(s): " + "; ".join(problems)) from None
        raise


def schema_problems(err, source: str) -> list[str]:
    return [f"{source}: {problem}" for problem in validation_problems(err)]


def drop_invalid(raw: dict, rounds: int = 10) -> Config | None:
    """The config with every invalid key removed (so its default applies), or None."""
    data = copy.deepcopy(raw)
    for _ in range(rounds):
        try:
            return Config.model_validate(data)
        except ValidationError as err:
            # Decide every removal before making any: one bad value can raise several errors
            # (one per union branch), and a later one must not climb to the whole section.
            targets = {_deepest_key(data, _key_of(e)) for e in err.errors()}
            for path in sorted(targets - {()}, key=len, reverse=True):
                parent = data
                for part in path[:-1]:
                    parent = parent.get(part, {})
                parent.pop(path[-1], None)
    return None


# A cross-field rule's error names the model it validates; the key that depends on the others
# is the one to drop (dropping the whole section would hide its valid keys, e.g. the student).
_DEPENDENT_KEY = {(): ["trainer", "min_lr"], ("model",): ["model", "teachers"]}


def _key_of(error: dict) -> list[str]:
    loc = [str(p) for p in error["loc"]]
    if error["type"] == "value_error" and tuple(loc) in _DEPENDENT_KEY:
        return _DEPENDENT_KEY[tuple(loc)]
    return loc


def _deepest_key(data: dict, loc: list[str]) -> tuple[str, ...]:
    """The deepest mapping key on `loc` that exists (a list item or a union's type tag in the
    location selects the whole value that holds it)."""
    if not loc:  # a cross-field rule (min_lr > lr): the dependent key
        loc = _DEPENDENT_KEY[()]
    path, node = [], data
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        path.append(part)
        node = node[part]
    return tuple(path)


def preflight_problems(cfg: Config, *, teachers_at_once: bool = True) -> list[str]:
    """Every config/data/model problem found, each a short phrase naming its YAML path."""
    problems: list[str] = []
    manifest = _manifest(cfg, problems)
    domains = _domains(cfg, manifest, problems)
    _mixture_problems(cfg, manifest, domains, problems)
    if manifest:
        problems.extend(
            f"model.teachers: '{d}' is not a domain of the run ({', '.join(domains)})"
            for d in cfg.model.teachers
            if d not in domains
        )
    configs, tokenizers = _models(cfg, problems)
    if manifest:
        _data_model_problems(cfg, manifest, configs, tokenizers, problems)
    problems.extend(_teacher_tokenizer_problems(cfg, manifest, tokenizers))
    if _teacher_roles(cfg) and (problem := launch_placement_problem(cfg)):
        problems.append(problem)
    if teachers_at_once:
        problems.extend(_placement_problems(cfg, configs))
    if cfg.model.lora is not None and "student" in configs:
        trust = cfg.model.trust_remote_code
        problems.extend(lora_problems(cfg.model.lora, configs["student"], trust))
    if cfg.teacher.mode == "offline" and cfg.distill.method != "cpt":
        problems.extend(cache_problems(cfg, manifest, domains))
    if cfg.teacher.mode == "served" and cfg.distill.method != "cpt":
        problems.extend(served_problems(cfg))
    if cfg.eval.tasks:
        plan = BenchmarkPlan.from_section(cfg.eval)
        problems.extend(plan_problems(plan, domains if manifest else None))
    return problems


def served_problems(cfg: Config) -> list[str]:
    """`teacher.mode: served` gives a top-k signal at tau 1 from teacher.url."""
    problems = []
    if not cfg.teacher.url:
        problems.append("teacher.url: required with teacher.mode served (the server's base URL)")
    if cfg.teacher.sparse_estimator == "sampled":
        problems.append(
            "teacher.mode served gives the top-k only (prompt_logprobs hold no tail draws); set "
            "teacher.sparse_estimator=topk"
        )
    if float(cfg.distill.tau) != 1.0:
        problems.append(
            f"teacher.mode served distils at tau 1 only (a server's prompt log-probs are the "
            f"model's own); distill.tau is {cfg.distill.tau}"
        )
    return problems


def _manifest(cfg: Config, problems: list[str]):
    """The prepared data's manifest, or None (with the problem noted)."""
    if not cfg.data.prepared:
        problems.append("data.prepared: required (the output folder of `ddk prepare`)")
        return None
    if not Path(cfg.data.prepared).expanduser().exists():
        problems.append(f"data.prepared: '{cfg.data.prepared}' does not exist; run `ddk prepare`")
        return None
    manifest, err = _load_quietly(read_manifest, Path(cfg.data.prepared).expanduser())
    if err:
        problems.append(f"data.prepared: {err}")
    return manifest


def _domains(cfg: Config, manifest, problems: list[str]) -> list[str]:
    """The run's domains that the data has."""
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
    return domains


def _mixture_problems(cfg: Config, manifest, domains: list[str], problems: list[str]) -> None:
    mixture = cfg.distill.mixture
    if not isinstance(mixture, dict) or not method_spec(cfg.distill.method).fixed_mixture:
        return
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


def _teacher_tokenizer_problems(cfg: Config, manifest, tokenizers: dict) -> list[str]:
    """A cross-tokenizer teacher (one, with byte spans in the data), else every teacher's
    tokenizer against the student's."""
    if cfg.teacher.tokenizer == "cross":
        for role, name in _teacher_roles(cfg):
            if role in tokenizers:  # it encodes the data's text at every step
                differs = tokenizer_file_difference(tokenizers[role], name)
                if differs:
                    print0(f"warning: model.{role}: {differs}")
        return list(cross_tokenizer_problems(cfg, manifest, tokenizers))
    problems = []
    for role, name in _teacher_roles(cfg):
        if "student" in tokenizers and role in tokenizers:
            _, err = _load_quietly(
                check_tokenizers_match, tokenizers[role], tokenizers["student"], name,
                cfg.model.student,
            )  # fmt: skip
            if err:
                problems.append(
                    f"model.{role}: {err} (or set teacher.tokenizer: cross for a teacher with "
                    "its own tokenizer, on data prepared with prepare.byte_spans: true)"
                )
    return problems


def _roles(cfg: Config, problems: list[str]) -> list[tuple[str, str]]:
    """The models to check: the student and, when it is on this machine, the teacher."""
    method, offline = cfg.distill.method, cfg.teacher.mode in ("offline", "served")
    roles = [("student", cfg.model.student)] if cfg.model.student else []
    stand_in = "teacher server" if cfg.teacher.mode == "served" else "offline cache"
    for role, name in _teacher_roles(cfg):
        if offline and method != "cpt" and not teacher_on_disk(name):
            # The cache or server stands in for the teacher: the training machine need not hold it.
            print0(
                f"warning: teacher '{name}' is not on this machine; the {stand_in} is "
                "checked against its name only"
            )
        else:
            roles.append((role, name))
    if not cfg.model.teacher and method != "cpt" and not offline:
        problems.append(f"model.teacher: required for distill.method '{method}'")
    if not cfg.model.student:
        problems.append("model.student: required (a hub id or a local folder)")
    return roles


def _teacher_roles(cfg: Config) -> list[tuple[str, str]]:
    """("teacher", model.teacher), then ("teachers.DOMAIN", path) for each other teacher of
    `model.teachers`, named by its first domain."""
    roles = {cfg.model.teacher: "teacher"} if cfg.model.teacher else {}
    for domain, name in cfg.model.teachers.items():
        roles.setdefault(name, f"teachers.{domain}")
    return [(role, name) for name, role in roles.items()]


def _placement_problems(cfg: Config, configs: dict) -> list[str]:
    """The online teachers of `model.teachers` held at once must fit the devices given."""
    teachers = [role for role, _ in _teacher_roles(cfg)]
    trains = method_spec(cfg.distill.method).trains_with_teacher(cfg.distill)
    if len(teachers) < 2 or cfg.teacher.mode != "online" or not trains:
        return []
    if not all(role in configs for role in teachers):
        return []  # a teacher that does not load is reported already
    problem, err = _load_quietly(teachers_placement_problem, cfg, dict(_teacher_roles(cfg)))
    return [err] if err else [problem] if problem else []


def _models(cfg: Config, problems: list[str]) -> tuple[dict, dict]:
    """({role: model config}, {role: tokenizer}) of the models that load."""
    configs, tokenizers = {}, {}
    for role, name in _roles(cfg, problems):
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
            print0(
                f"warning: no tokenizer in teacher '{name}' ({err}); only its output size is checked"
            )
    return configs, tokenizers


def _data_model_problems(cfg: Config, manifest, configs, tokenizers, problems) -> None:
    """The data against the models: context length, tokenizer, output rows."""
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
        if role != "student" and cfg.teacher.tokenizer == "cross":
            continue  # its own vocabulary: checked against its own tokenizer when it loads
        rows = getattr(model_cfg, "vocab_size", None)
        if rows is not None and rows < vocab:
            problems.append(
                f"model.{role}: vocabulary mismatch: its output layer has {rows} rows but the "
                f"tokenizer has {vocab} tokens"
            )
