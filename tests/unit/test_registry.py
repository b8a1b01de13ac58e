"""The method registry, configs and YAML presets."""

from __future__ import annotations

import dataclasses
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
