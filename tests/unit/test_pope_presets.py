"""Task presets in vlmfix/configs/eval: include resolution, shipped files, errors."""

from __future__ import annotations

import pytest

from vlmfix.errors import ConfigError
from vlmfix.eval.tasks import CONFIG_DIR, load_task_config

pytestmark = pytest.mark.skipif(not CONFIG_DIR.is_dir(), reason="vlmfix/configs/eval not present: the package was installed without its data")


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_pope_split_presets_include_the_base(split):
    cfg = load_task_config(f"pope_{split}")
    assert cfg == {**load_task_config(CONFIG_DIR / "pope.yaml"), "split": split}
    assert cfg["template"] == "llava" and cfg["parser"] == "pope_official" and cfg["n_images"] == 500


def test_chair_preset():
    cfg = load_task_config("chair")
    assert cfg["prompt"] == "Please describe this image in detail."
    assert cfg["normalizer"] == "lemma" and cfg["n"] == 500 and cfg["max_new_tokens"] == 512


def test_include_override_cycle_and_missing(tmp_path):
    (tmp_path / "base.yaml").write_text("a: 1\nb: 2\n")
    (tmp_path / "child.yaml").write_text("include: base.yaml\nb: 3\n")
    assert load_task_config(tmp_path / "child.yaml") == {"a": 1, "b": 3}
    (tmp_path / "x.yaml").write_text("include: y.yaml\n")
    (tmp_path / "y.yaml").write_text("include: x.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_task_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_task_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_task_config(tmp_path / "list.yaml")
