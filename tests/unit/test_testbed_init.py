"""vlmfix.testbed's light entry point: model_path and its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import vlmfix.testbed as tb
from vlmfix.errors import ConfigError, ModelNotFoundError


def test_import_is_light():
    code = "import sys, vlmfix.testbed; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_variant_suggests_a_name():
    with pytest.raises(ConfigError, match="Did you mean 'clean'"):
        tb.model_path("clen")


def test_missing_weights_name_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "MODELS_DIR", tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"python scripts/train_testbed.py --variant clean --out"):
        tb.model_path("clean")
    assert tb.available_variants() == []


def test_shipped_variants_resolve():
    for v in tb.available_variants():
        path = tb.model_path(v)
        # the v2 attention_sink LM is wider (hidden 512, so VAR's tau = 20 can fire): 17.3 MB
        limit = 18_000_000 if v == "attention_sink" else 10_000_000
        assert (path / "model.safetensors").stat().st_size < limit
        assert (path / "tokenizer.json").is_file() and (path / "processor_config.json").is_file()


def test_installed_package_stays_small():
    # what setuptools ships: every file of the vlmfix package, weights and examples included
    root = Path(tb.__file__).resolve().parents[1]
    files = [f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    # three v1 variants (24.3 MB) + under_attention (8.1 MB) + attention_sink (17.3 MB)
    assert sum(f.stat().st_size for f in files) <= 52_000_000
