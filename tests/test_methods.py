"""The methods table is the one place that says what each method needs."""

import typing

import pytest

from ddk.config import DistillSection, Method, Preset
from ddk.domains import next_weights
from ddk.methods import METHODS, PRESETS, method_spec


def test_every_config_method_is_in_the_table_and_back():
    assert set(typing.get_args(Method)) == set(METHODS)


def test_every_config_preset_is_in_the_table_and_names_real_keys():
    assert set(typing.get_args(Preset)) == set(PRESETS)
    for name, keys in PRESETS.items():
        assert keys and set(keys) <= set(DistillSection.model_fields) - {"method", "preset"}
        DistillSection(**keys).steering()  # valid values
        assert DistillSection(preset=name).model_dump(include=set(keys)) == keys


def test_teacher_rules():
    assert not METHODS["cpt"].uses_divergence and not METHODS["cpt"].needs_teacher
    assert METHODS["kd"].teacher_for_training and not METHODS["kd"].teacher_for_weights
    assert METHODS["ddk"].teacher_for_weights and METHODS["ddk"].teacher_for_training
    assert [m for m, s in METHODS.items() if s.fixed_mixture] == ["kd", "cpt"]


@pytest.mark.parametrize("name", list(METHODS))
def test_next_weights_follows_the_table(name):
    spec = method_spec(name)
    w = next_weights(name, 0, None, [4.0, 2.0], [1.0, 1.0], 0.5, [0.25, 0.75], ["a", "b"])
    expected = {
        "eq1_then_eq2": None,
        "eq1_every_interval": None,
        "fixed": [0.25, 0.75],
        "uniform": [0.5, 0.5],
    }[spec.weights]
    if expected is None:  # Eq. 1: softmax of ratios 4 and 2
        assert w[0] > w[1] and abs(w.sum() - 1) < 1e-12
    else:
        assert list(w) == expected


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("nope")
