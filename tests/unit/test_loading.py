"""vlmfix.load: local folders, unsupported architectures, offline hub ids, no import side effects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix.errors import ConfigError, ModelNotFoundError, UnsupportedModelError


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_load_saved_checkpoint_folder(tmp_path, family):
    model, processor = tiny(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc = vlmfix.load(tmp_path, dtype="float32", device="cpu")
    assert type(loaded) is type(model)
    a = vlmfix.generate(model, processor, make_images(2), PROMPTS[:2], max_new_tokens=4)
    b = vlmfix.generate(loaded, proc, make_images(2), PROMPTS[:2], max_new_tokens=4)
    assert a.token_ids == b.token_ids


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="llava, llava_next, llava_onevision"):
        vlmfix.load(tmp_path)


def test_get_adapter_rejects_other_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmfix.adapters import get_adapter

    m = LlamaForCausalLM(
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="supports"):
        vlmfix.attach(m)
    with pytest.raises(UnsupportedModelError):
        get_adapter(m)


def test_missing_local_path_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        vlmfix.load(str(tmp_path / "no" / "such"))
    with pytest.raises(ModelNotFoundError, match="local folder"):
        vlmfix.load("vlmfix-test-org/definitely-not-a-model")


def test_bad_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        vlmfix.load("tiny-random", dtype="float8")


def test_tiny_random_dtype_and_family():
    m, _ = vlmfix.load("tiny-random:llava_onevision", dtype="bfloat16", device="cpu")
    assert next(m.parameters()).dtype == torch.bfloat16
    assert m.config.text_config.num_key_value_heads < m.config.text_config.num_attention_heads


def test_import_has_no_side_effects():
    code = (
        "import sys, vlmfix, vlmfix.methods;"
        "assert 'transformers' not in sys.modules, 'transformers imported';"
        "from transformers import AttentionInterface;"
        "assert 'vlmfix' not in AttentionInterface._global_mapping;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
