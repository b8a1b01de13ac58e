"""Testbed tokenizer / processor / model wiring, in HF format and offline."""

from __future__ import annotations

import pytest
import torch

from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.processing import (
    NUM_IMAGE_TOKENS,
    VOCAB,
    build_processor,
    normalize,
    prompt_text,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A freshly built model + processor saved as one HF folder (fp32, random weights)."""
    from vlmfix.testbed.modeling import build_model

    path = tmp_path_factory.mktemp("testbed_hf")
    build_processor().save_pretrained(path)
    build_model(seed=3).save_pretrained(path)
    return path


def test_tokenizer_is_word_level_lowercase_with_specials():
    tok = build_processor().tokenizer
    assert len(tok) == len(VOCAB) and len(VOCAB) < 64
    ids = tok("Is there a Dog in the image?").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "is", "there", "a", "dog", "in", "the", "image", "?"]
    assert tok.convert_ids_to_tokens(tok("a zebra", add_special_tokens=False).input_ids) == ["a", "<unk>"]
    assert tok.decode(
        tok(" a fork and a knife.</s>", add_special_tokens=False).input_ids, skip_special_tokens=True
    ) == ("a fork and a knife.")
    assert tok.padding_side == "left" and tok.pad_token_id == VOCAB["<pad>"]
    assert tok.convert_tokens_to_ids("<image>") == VOCAB["<image>"]


def test_chat_template_is_llava_style():
    proc = build_processor()
    assert prompt_text(proc, "describe the image.") == "USER: <image>\ndescribe the image. ASSISTANT:"
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a dog in the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
    ]
    text = proc.apply_chat_template(conv, tokenize=False)
    assert text.startswith("USER: <image>\nis there a dog") and text.rstrip().endswith("ASSISTANT: yes</s>")


def test_processor_loads_offline_and_expands_image_to_model_features(saved):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(saved)
    model = LlavaForConditionalGeneration.from_pretrained(saved).eval()
    batch = scenes.sample(0, range(3))
    images = scenes.to_pil(scenes.render(batch))
    prompts = ["describe the image.", "is there a dog in the image?", "please describe this image in detail."]
    enc = proc(text=[prompt_text(proc, p) for p in prompts], images=images, return_tensors="pt", padding=True)
    n_image_tokens = (enc["input_ids"] == model.config.image_token_id).sum(1)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"])
        feats = getattr(feats, "pooler_output", feats)
        per_image = [f.shape[0] for f in feats] if isinstance(feats, (list, tuple)) else [feats.shape[1]] * len(images)
        assert n_image_tokens.tolist() == per_image == [NUM_IMAGE_TOKENS] * 3
        out = model(**enc)
    assert out.logits.shape == (*enc["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    # the processor's pixels are exactly what training computes from the uint8 render
    assert torch.equal(enc["pixel_values"], normalize(scenes.render(batch)))


def test_processor_round_trips_through_save_and_autoprocessor(saved):
    # save_pretrained -> AutoProcessor.from_pretrained gives back the same processor:
    # same tokens, padding side, chat template, pixels and decoded text
    from transformers import AutoProcessor

    built, loaded = build_processor(), AutoProcessor.from_pretrained(saved)
    assert type(loaded) is type(built)
    assert loaded.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert loaded.tokenizer.padding_side == built.tokenizer.padding_side == "left"
    prompts = ["describe the image.", "is there a Cat in the image? answer the question using a single word or phrase."]
    texts = [prompt_text(p_, q) for p_ in (built, loaded) for q in prompts]
    assert texts[:2] == texts[2:]
    images = scenes.to_pil(scenes.render(scenes.sample(5, range(2), kind="adversarial")))
    a = built(text=texts[:2], images=images, return_tensors="pt", padding=True)
    b = loaded(text=texts[2:], images=images, return_tensors="pt", padding=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = a["input_ids"][1].tolist()
    assert loaded.decode(ids, skip_special_tokens=True) == built.decode(ids, skip_special_tokens=True)


def test_model_is_small_llava_with_sdpa(saved):
    from transformers import LlavaForConditionalGeneration

    from vlmfix.testbed.modeling import count_parameters

    model = LlavaForConditionalGeneration.from_pretrained(saved)
    assert count_parameters(model) < 10_000_000
    cfg = model.config
    assert cfg.vision_config.hidden_size == 256 and cfg.vision_config.num_hidden_layers == 4
    assert cfg.vision_config.patch_size == cat.PATCH_SIZE and cfg.vision_config.image_size == cat.IMAGE_SIZE
    assert cfg.text_config.hidden_size == 256 and cfg.text_config.num_hidden_layers == 4
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.text_config.vocab_size >= len(VOCAB)
    assert model.config._attn_implementation == "sdpa"


def test_model_init_is_seeded():
    from vlmfix.testbed.modeling import build_model

    state = torch.random.get_rng_state()
    a, b, c = build_model(seed=1), build_model(seed=1), build_model(seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    pa, pb, pc = (m.model.language_model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
