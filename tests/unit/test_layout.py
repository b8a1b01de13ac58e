"""Layouts: image positions from input_ids, any-res parts, padding, extension."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.generation import prepare_inputs
from vlmfix.layout import Label, Part, build_layout


def _lm_inputs_embeds(model, inputs):
    """The language model's input embeddings for a batch (captured by a hook)."""
    captured = {}
    lm = get_adapter(model).get(model, "language_model")

    def grab(module, args, kwargs):
        captured["e"] = kwargs["inputs_embeds"]

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return captured["e"]


def test_llava_image_block_and_padding():
    model, processor = tiny("llava")
    inputs = prepare_inputs(processor, make_images(2), PROMPTS[:2])
    lay = build_layout(model.config, get_adapter(model), inputs["input_ids"], inputs["attention_mask"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    for b in range(2):
        where = (ids[b] == model.config.image_token_id).nonzero().flatten()
        assert len(where) == n_img
        assert lay.image_start[b] == where[0] and lay.image_end[b] == where[-1] + 1
        assert (lay.labels[b][where] == Label.IMAGE).all()
        assert ((lay.labels[b] == Label.PAD) == (mask[b] == 0)).all()
        assert (lay.parts[b][where] == Part.BASE).all()
    assert lay.pad_mask[0].any() or lay.pad_mask[1].any()


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_parts_match_the_embeddings(family):
    """Newline positions computed from image sizes hold exactly the model's image_newline."""
    model, processor = tiny(family)
    imgs = make_images(4)  # several aspect ratios -> different grids
    inputs = prepare_inputs(processor, imgs, PROMPTS[:4])
    lay = build_layout(
        model.config, get_adapter(model), inputs["input_ids"], inputs["attention_mask"], inputs["image_sizes"]
    )
    assert not lay.unresolved
    embeds = _lm_inputs_embeds(model, inputs)
    newline = model.model.image_newline
    base = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    grids = set()
    for b in range(4):
        is_nl = (embeds[b] == newline).all(-1)
        assert torch.equal(is_nl, lay.parts[b] == Part.NEWLINE)
        assert is_nl.sum() > 0
        img = (lay.parts[b] != Part.NONE).nonzero().flatten()
        assert (lay.parts[b][img[:base]] == Part.BASE).all()
        assert (lay.parts[b][img[base:]] != Part.BASE).all()
        # rows of equal width, each ending in a newline
        grid_part = lay.parts[b][img[base:]]
        nl_idx = (grid_part == Part.NEWLINE).nonzero().flatten()
        widths = torch.diff(torch.cat([torch.tensor([-1]), nl_idx]))
        assert len(set(widths.tolist())) == 1
        assert nl_idx[-1] == len(grid_part) - 1
        grids.add((len(nl_idx), int(widths[0])))
    assert len(grids) > 1, "the images should produce different any-res grids"


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_layout_without_image_sizes_is_resolved_during_stock_generate(family):
    """transformers' generate passes pre-encoded features (no image_sizes); attach still
    finds the same parts from the LM's input embeddings."""
    model, processor = tiny(family)
    inputs = prepare_inputs(processor, make_images(3), PROMPTS[:3])
    expected = build_layout(
        model.config, get_adapter(model), inputs["input_ids"], inputs["attention_mask"], inputs["image_sizes"]
    )
    with vlmfix.attach(model) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        lay = handle.layout
    L = inputs["input_ids"].shape[1]
    assert torch.equal(lay.parts[:, :L], expected.parts)
    assert torch.equal(lay.labels[:, :L], expected.labels)
    assert lay.length == L + 2  # two decode steps after the prefill
    assert (lay.labels[:, L:] == Label.TEXT).all()


def test_extend_and_select():
    model, processor = tiny("llava")
    inputs = prepare_inputs(processor, make_images(2), PROMPTS[:2])
    lay = build_layout(model.config, get_adapter(model), inputs["input_ids"], inputs["attention_mask"])
    ext = lay.extend(2, torch.tensor([[1, 0], [1, 1]]))
    assert ext.length == lay.length + 2
    assert ext.labels[0, -2] == Label.TEXT and ext.labels[0, -1] == Label.PAD
    sub = ext.select([1, 1])
    assert torch.equal(sub.labels[0], ext.labels[1]) and torch.equal(sub.labels[1], ext.labels[1])
    assert ext.prompt_length == lay.length


def test_mismatched_count_falls_back_to_base(caplog):
    model, _ = tiny("llava_next")
    ids = torch.tensor([[1, 5] + [model.config.image_token_id] * 23 + [6]])
    lay = build_layout(model.config, get_adapter(model), ids, None, torch.tensor([[40, 50]]))
    assert (lay.parts[0, 2:25] == Part.BASE).all()
    assert "do not match" in caplog.text


def test_has_image_is_known_on_the_host():
    model, _ = tiny("llava")
    adapter = get_adapter(model)
    text_only = build_layout(model.config, adapter, torch.tensor([[1, 5, 6, 7]]))
    with_image = build_layout(model.config, adapter, torch.tensor([[1, model.config.image_token_id, 6]]))
    assert text_only.has_image is False and not text_only.image_mask.any()
    assert with_image.has_image is True and with_image.extend(2).has_image is True
