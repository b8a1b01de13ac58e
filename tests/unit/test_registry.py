"""The method registry, configs and YAML presets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import vlmfix
from vlmfix import methods
from vlmfix.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "vlmfix" / "configs" / "methods"


@pytest.mark.parametrize("name", methods.available())
def test_roundtrip_and_frozen(name):
    cls = methods.get(name)
    cfg = cls()
    assert cls.from_dict(cfg.to_dict()) == cfg
    if dataclasses.fields(cfg):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, dataclasses.fields(cfg)[0].name, None)
    assert isinstance(cfg.build(), methods.Method)


def test_unknown_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'baseline'"):
        methods.get("baseline2")


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="unknown option"):
        methods.build_config("baseline", {"alpha": 1})


def test_parse_and_yaml(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: baseline\n")
    # named by --method and by a preset: applied once, not twice
    assert [c.name for c in methods.parse(["baseline"], [str(p)])] == ["baseline"]
    with pytest.raises(ConfigError, match="not selected"):
        methods.parse(["baseline"], ["var.alpha=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        methods.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        methods.from_yaml(bad)


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_load(preset):
    assert methods.from_yaml(preset)


def test_top_level_names():
    assert vlmfix.methods.get("baseline") is vlmfix.Baseline


@pytest.mark.parametrize(
    "spec, message",
    [
        ("alpha=abc", "alpha='abc' (str) is invalid; alpha takes a float"),
        ("alpha=true", "alpha=True (bool) is invalid; alpha takes a float"),
        ("noise_step=2.5", "noise_step=2.5 (float) is invalid; noise_step takes an int"),
        ("alpha=[1, 2]", "alpha=[1, 2] (list) is invalid"),
    ],
)
def test_wrongly_typed_values_are_rejected_not_recorded(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        methods.parse(["vcd"], [spec])


def test_typed_values_are_coerced_where_lossless():
    (cfg,) = methods.parse(["vcd"], ["alpha=2"])
    assert cfg.alpha == 2.0 and isinstance(cfg.alpha, float)
    (var,) = methods.parse(["var"], ["layers=[2, 3]"])
    assert var.layers == (2, 3)
    with pytest.raises(ConfigError, match=re.escape("layers[1]='x' (str) is invalid")):
        methods.parse(["var"], ["layers=[2, x]"])
    with pytest.raises(ConfigError, match=r"disturbance=123 .*\(quote text"):
        methods.parse(["icd"], ["disturbance=123"])
    (icd,) = methods.parse(["icd"], ["disturbance='123'"])
    assert icd.disturbance == "123"


def test_method_named_and_in_a_preset_is_merged_once_with_a_warning(tmp_path, caplog):
    p = tmp_path / "vcd.yaml"
    p.write_text("name: vcd\nalpha: 0.5\nbeta: 0.2\n")
    with caplog.at_level("WARNING", logger="vlmfix.methods"):
        got = methods.parse(["vcd", "var"], [str(p), "vcd.alpha=3"])
    assert [c.name for c in got] == ["vcd", "var"]
    assert got[0].alpha == 3.0 and got[0].beta == 0.2  # preset values, then the override
    assert "given by --method and by the preset" in caplog.text
    other = tmp_path / "vcd2.yaml"
    other.write_text("name: vcd\n")
    with pytest.raises(ConfigError, match="in two presets"):
        methods.parse([], [str(p), str(other)])
    with pytest.raises(ConfigError, match="more than once"):
        methods.parse(["vcd", "VCD"], [])
