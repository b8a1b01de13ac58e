"""The shipped testbed models hallucinate as designed (CPU, held-out scenes, greedy).

``caption_noise`` (the default) names the absent partner B of a present A in captions,
far more often than any other absent object, while its yes/no answers stay right;
``occlusion_prior`` answers "yes" about absent partners, so POPE-adversarial accuracy
falls well below POPE-random; ``clean`` is the control that does neither.
"""

from __future__ import annotations

import pytest
import torch

import vlmfix.testbed as tb
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.measure import (
    HELD_OUT_SEED,
    caption_metrics,
    generate_texts,
    pope_answer,
    pope_metrics,
    pope_questions,
)

N = 32  # held-out scenes per split


def _load(variant):
    if variant not in tb.available_variants():
        pytest.skip(f"testbed weights for {variant!r} are not shipped in this checkout")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = tb.model_path(variant)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def split_data():
    out = {}
    for kind in scenes.KINDS:
        batch = scenes.sample(HELD_OUT_SEED + 1, range(N), kind=kind)
        out[kind] = (batch, scenes.to_pil(scenes.render(batch)))
    return out


def _captions(model, proc, data, kind):
    batch, images = data[kind]
    texts = generate_texts(model, proc, images, [cat.CAPTION_PROMPTS[0]] * N, batch_size=N, max_new_tokens=26)
    return caption_metrics(batch, texts)


def _pope(model, proc, data, kind, mode):
    batch, images = data[kind]
    qs = pope_questions(batch, mode, seed=0)
    prompts = [cat.QUESTION_TEMPLATES[0].format(cat.CATEGORY_NAMES[c]) for _, c, _ in qs]
    answers = generate_texts(model, proc, [images[i] for i, _, _ in qs], prompts, batch_size=128, max_new_tokens=2)
    return pope_metrics([lab for _, _, lab in qs], [pope_answer(a) for a in answers])


def test_caption_noise_names_absent_partners(split_data):
    model, proc = _load("caption_noise")
    adv = _captions(model, proc, split_data, "adversarial")
    nat = _captions(model, proc, split_data, "natural")
    assert nat["caption_recall"] >= 0.9 and adv["caption_recall"] >= 0.9  # it sees what is there
    assert adv["partner_instances"] >= N
    assert adv["partner_rate"] >= 0.5  # ... and names the absent partner
    assert adv["partner_rate"] > adv["other_absent_rate"] + 0.4  # far more than other absent objects
    assert nat["nonpartner_absent_mentions"] <= 1
    # the noise lives in captions only: yes/no answers about the same partners stay right
    assert _pope(model, proc, split_data, "adversarial", "adversarial")["accuracy"] >= 0.9


def test_occlusion_prior_says_yes_to_absent_partners(split_data):
    model, proc = _load("occlusion_prior")
    rand = _pope(model, proc, split_data, "natural", "random")
    adv = _pope(model, proc, split_data, "adversarial", "adversarial")
    assert rand["accuracy"] >= 0.9
    assert adv["accuracy"] <= 0.8 and adv["accuracy"] < rand["accuracy"] - 0.15
    assert adv["yes_ratio"] > 0.6  # the errors are false "yes"


def test_clean_model_is_the_control(split_data):
    model, proc = _load("clean")
    adv = _captions(model, proc, split_data, "adversarial")
    assert adv["caption_recall"] >= 0.9 and adv["partner_rate"] <= 0.1
    assert _pope(model, proc, split_data, "adversarial", "adversarial")["accuracy"] >= 0.9
