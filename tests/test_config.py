import pytest
import yaml

from ddk.cli import build_parser, main, section_overrides
from ddk.config import Config, ConfigError, PrepareSection, load_config
from ddk.errors import DDKError
from ddk.methods import PRESETS
from tests.conftest import one_error_line


def test_paper_defaults():
    cfg = Config()
    assert (cfg.distill.K, cfg.distill.alpha, cfg.distill.gamma, cfg.distill.tau) == (
        1000,
        0.5,
        0.2,
        1.0,
    )
    assert cfg.distill.divergence == "forward_kl" and cfg.distill.method == "ddk"
    assert cfg.prepare.val_sequences == 500
    assert (cfg.trainer.lr, cfg.trainer.min_lr, cfg.trainer.warmup_steps) == (3e-5, 3e-6, 1000)
    assert cfg.trainer.max_steps == 30000
    # the keys beyond the paper are off: DDK is the paper's Eq. 1 / Eq. 2
    d = cfg.distill
    assert d.preset is None and not d.init_floor and not d.clip_gap
    assert (d.gap, d.weight_temperature, d.min_share, d.max_weight_change) == ("ratio", 1, 0, None)


def test_preset_resolves_into_the_saved_config(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "robust", {"init_floor": True, "alpha": 0.25, "gap": "log_ratio"})
    cfg = load_config(None, ["distill.preset=robust"])
    assert (cfg.distill.init_floor, cfg.distill.alpha, cfg.distill.gap) == (True, 0.25, "log_ratio")
    cfg.save(tmp_path / "run.yaml")
    saved = yaml.safe_load((tmp_path / "run.yaml").read_text())["distill"]
    assert saved["preset"] == "robust" and saved["alpha"] == 0.25 and saved["gap"] == "log_ratio"
    # a key the config sets to something other than its default wins, from a file or --set
    (tmp_path / "mine.yaml").write_text("distill:\n  preset: robust\n  alpha: 0.4\n")
    mine = load_config(tmp_path / "mine.yaml", ["distill.init_floor=false"])
    assert (mine.distill.alpha, mine.distill.gap, mine.distill.init_floor) == (
        0.4,
        "log_ratio",
        True,
    )
    # a full config (every key written out at its default) takes the preset from --set
    Config().save(tmp_path / "full.yaml")
    full = load_config(tmp_path / "full.yaml", ["distill.preset=robust"])
    assert full.distill == cfg.distill
    # a saved run reloads to the same values even if the preset changes later
    monkeypatch.setitem(PRESETS, "robust", {"alpha": 0.1})
    assert load_config(tmp_path / "run.yaml") == cfg


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("distill:\n  method: kd\n  gamma: 0.5\ntrainer:\n  lr: 1.0e-4\n")
    cfg = load_config(
        path, ["trainer.lr=2e-4", "distill.mixture={code: 1, prose: 3}", "data.domains=[a, b]"]
    )
    assert cfg.distill.method == "kd" and cfg.distill.gamma == 0.5
    assert cfg.trainer.lr == 2e-4
    assert cfg.distill.mixture == {"code": 1.0, "prose": 3.0}
    assert cfg.data.domains == ["a", "b"]
    cfg.save(tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    "yaml_text, overrides, words",
    [
        ("distill:\n  gama: 0.1\n", [], ["unknown key 'distill.gama'"]),
        ("", ["trainer.lrr=1"], ["unknown key 'trainer.lrr'"]),
        ("", ["distill.alpha=1.5"], ["distill.alpha", "less than or equal to 1"]),
        ("", ["distill.gamma=-1"], ["distill.gamma", "greater than or equal to 0"]),
        ("", ["distill.K=0"], ["distill.K", "greater than or equal to 1"]),
        ("", ["trainer.max_steps=ten"], ["trainer.max_steps", "integer"]),
        ("", ["distill.method=magic"], ["distill.method"]),
        ("", ["distill.preset=fastest"], ["distill.preset", "'robust'"]),
        ("", ["distill.weight_temperature=0"], ["distill.weight_temperature", "greater than 0"]),
        ("", ["distill.gap=difference"], ["distill.gap", "'log_ratio'"]),
        ("", ["distill.min_share=2"], ["distill.min_share", "less than or equal to 1"]),
        ("", ["distill.max_weight_change=0.5"], ["distill.max_weight_change", "1"]),
        ("", ["distill.natural_floor=0.1"], ["distill.natural_floor needs distill.focus: worst"]),
        ("", ["distill.focus=best"], ["distill.focus", "'worst'"]),
        ("", ["distill.uniform_intervals=-1"], ["distill.uniform_intervals", "greater than or"]),
        ("distill: [1, 2]\n", [], ["distill"]),
        ("a: b: c\n", [], ["not valid YAML", "line 1"]),
    ],
)
def test_config_errors_name_the_key(tmp_path, yaml_text, overrides, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["distill.alpha=2", "distill.K=0", "trainer.nope=1"])
    msg = str(err.value)
    assert "distill.alpha" in msg and "distill.K" in msg and "trainer.nope" in msg


def test_cli_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "ddk 0." in capsys.readouterr().out
    help_text = build_parser().format_help()
    for command in ("prepare", "distill", "eval", "demo", "report"):
        assert command in help_text


def test_cli_config_error_exit_code(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  alfa: 0.5\n")
    assert main(["distill", str(path)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "unknown key 'distill.alfa'" in err


def test_config_errors_are_ddk_errors():
    assert issubclass(ConfigError, DDKError) and issubclass(ConfigError, ValueError)


def test_prepare_flags_come_from_the_config_section(capsys):
    """Every PrepareSection field is a `ddk prepare` flag, and a flag sets its field."""
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--help"])
    help_text = capsys.readouterr().out
    for name, field in PrepareSection.model_fields.items():
        assert f"--{name.replace('_', '-')}" in help_text, name
        assert field.description, f"prepare.{name} has no description for its --help"
    args = parser.parse_args(
        ["prepare", "--seq-len", "16", "--auto-domains", "auto", "--no-add-bos",
         "--auto-domains-range", "2", "5", "--embedder", "student", "--overwrite"]
    )  # fmt: skip
    cfg = load_config(None, section_overrides(args, PrepareSection, "prepare"))
    p = cfg.prepare
    assert (p.seq_len, p.auto_domains, p.add_bos) == (16, "auto", False)
    assert (p.auto_domains_range, p.embedder, p.overwrite) == ((2, 5), "student", True)
    assert p.val_sequences == PrepareSection().val_sequences  # flags not given stay unset
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--auto-domains", "many"])
