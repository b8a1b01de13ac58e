"""Testbed v2 (issue 17): faint partners, the attention_sink architecture and recipes."""

from __future__ import annotations

import json

import pytest
import torch

from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.modeling import ARCH, arch_for, build_config
from vlmfix.testbed.train import TrainConfig


@pytest.mark.parametrize("variant", cat.FAINT_PARTNER_VARIANTS)
def test_faint_partners_keep_the_clean_labels_and_dim_only_attached_partners(variant):
    b = scenes.sample(0, range(3000), variant=variant)
    ref = scenes.sample(0, range(3000), variant="clean")
    assert torch.equal(b.visible, ref.visible) and torch.equal(b.cats, ref.cats) and not b.hidden.any()
    faint = b.contrast < 1
    low, span = cat.FAINT_CONTRAST
    assert ((b.contrast[faint] >= low - 1 / 256) & (b.contrast[faint] <= low + span + 1 / 256)).all()  # 1/256 steps
    heads = {cat.category_index(bb): cat.category_index(a) for a, bb in cat.PAIRS}
    for i, k in faint.nonzero().tolist():
        c = int(b.cats[i, k])
        assert c in heads and b.visible[i, heads[c]]  # only a partner drawn with its head
    attached = sum(int(b.visible[i, heads[int(c)]]) for i, row in enumerate(b.cats) for c in row if int(c) in heads)
    assert abs(faint.sum().item() / attached - b.strength) < 0.05
    # a faint glyph is drawn between the background and its colour; others are unchanged
    img, img_ref = scenes.render(b).int(), scenes.render(ref).int()
    changed = (img != img_ref).any(-1)
    assert changed.any()
    assert (faint.any(1) | ~changed.flatten(1).any(1)).all()  # only scenes with faint glyphs change
    i, k = faint.nonzero()[0].tolist()
    colour = torch.tensor(cat.COLOURS[cat.CATEGORIES[int(b.cats[i, k])].colour])
    bg = int(b.bg[i])
    px = img[i][changed[i]]
    assert ((px - bg).abs() <= (colour - bg).abs() + 1).all()


def test_test_splits_are_never_faint():
    assert scenes.sample(1, range(50), kind="adversarial").contrast is None
    assert scenes.sample(1, range(50), variant="clean").contrast is None
    assert scenes.make_scene(2024, 0, variant="under_attention").image.size == (64, 64)


def test_attention_sink_arch_can_exceed_the_paper_tau():
    arch = arch_for("attention_sink")
    assert arch["text_hidden"] ** 0.5 > 20.0 > ARCH["text_hidden"] ** 0.5  # |RMSNorm(x)[d]| <= sqrt(hidden)
    assert arch_for("under_attention") == ARCH and arch_for(None) == ARCH
    cfg = build_config(arch)
    assert cfg.text_config.hidden_size == 512 and cfg.text_config.num_hidden_layers == 5
    assert cfg.text_config.hidden_size // cfg.text_config.num_attention_heads == 64
    assert build_config().text_config.hidden_size == ARCH["text_hidden"]


def test_variant_recipes():
    sink = TrainConfig.for_variant("attention_sink")
    assert sink.weight_decay == 0.1 and sink.prompt_loss and 0 < sink.blind_steps < sink.steps
    assert TrainConfig.for_variant("attention_sink", steps=6010).steps == 6010
    ua = TrainConfig.for_variant("under_attention")
    assert (ua.blind_steps, ua.finetune_lr, ua.steps) == (600, 5e-4, 4600) and not ua.prompt_loss
    assert TrainConfig.for_variant("clean").blind_steps == 0


@pytest.mark.slow
def test_smoke_training_attention_sink_loads_as_testbed_variant(tmp_path, monkeypatch):
    import vlmfix
    import vlmfix.testbed as tb
    from vlmfix.testbed.train import main

    assert main(["--smoke", "--variant", "attention_sink", "--out", str(tmp_path / "attention_sink")]) == 0
    meta = json.loads((tmp_path / "attention_sink" / "testbed.json").read_text())
    assert meta["arch"]["text_hidden"] == 512 and meta["config"]["weight_decay"] == 0.1
    monkeypatch.setattr(tb, "MODELS_DIR", tmp_path)
    assert "attention_sink" in tb.available_variants()
    model, processor = vlmfix.load("testbed:attention_sink", dtype="float32", device="cpu")
    assert model.config.text_config.hidden_size == 512
    out = vlmfix.generate(model, processor, [scenes.make_scene(3, 0).image], ["describe the image."],
                          [vlmfix.methods.build_config("var", {})], max_new_tokens=3)  # fmt: skip
    assert len(out.texts) == 1


def test_faint_rendering_is_integer_exact():
    b = scenes.sample(0, range(400), variant="under_attention")
    img = scenes.render(b).long()
    faint = (b.contrast < 1).nonzero().tolist()
    assert faint
    for i, k in faint[:20]:
        colour = torch.tensor(cat.COLOURS[cat.CATEGORIES[int(b.cats[i, k])].colour])
        cx, cy = int(b.cx[i, k]), int(b.cy[i, k])  # the glyph's centre pixel is always inside it
        c256 = round(float(b.contrast[i, k]) * 256)
        bg = int(b.bg[i])
        expect = bg + torch.div((colour - bg) * c256 + 128, 256, rounding_mode="floor")
        assert torch.equal(img[i, cy, cx], expect)
