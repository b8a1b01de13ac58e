"""Disease measurements on a shipped testbed model (CPU, a handful of scenes)."""

from __future__ import annotations

import numpy as np
import pytest

import vlmfix
from vlmfix.testbed import catalog as cat
from vlmfix.testbed import scenes
from vlmfix.testbed.disease import attention_and_sinks, hallucination_counts, markdown_report, measure_disease
from vlmfix.testbed.measure import caption_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clean():
    return vlmfix.load("testbed:clean", dtype="float32", device="cpu")


def test_attention_row_and_sink_rule(clean):
    model, processor = clean
    batch = scenes.sample(1000003, range(3), kind="adversarial")
    images = scenes.to_pil(scenes.render(batch))
    att = attention_and_sinks(model, processor, images, cat.CAPTION_PROMPTS[0], batch_size=2, taus=(1e-3, 20.0, 1e9))
    assert model.config._attn_implementation == "sdpa"  # eager only for the pass
    n_layers = model.config.text_config.num_hidden_layers
    assert att["image_mass"].shape == (3, n_layers)
    assert ((att["image_mass"] >= 0) & (att["image_mass"] <= 1)).all()
    # every token passes a tiny tau: 64 image tokens, the rest of the prompt is text
    assert (att["image_sinks"][1e-3] == 64).all()
    assert (att["text_sinks"][1e-3] > 0).all()
    assert (att["image_sinks"][1e9] == 0).all()
    # phi <= sqrt(hidden): the paper's tau cannot fire on a 256-wide LM
    assert (att["bos_phi"] <= 16.0 + 1e-4).all()
    assert (att["image_sinks"][20.0] == 0).all() and att["dims_source"] == "discovered"
    # the shipped models look at the image: most of the middle-layer mass is on it
    assert att["image_mass"][:, 1:-1].mean() > 0.3


def test_counts_agree_with_measure():
    batch = scenes.sample(1000003, range(4), kind="adversarial")
    names = [[cat.CATEGORY_NAMES[c] for c in row.nonzero().flatten().tolist()] for row in batch.labelled]
    caps = ["a " + " and a ".join(n) + " and a knife and a sink." for n in names]
    counts = hallucination_counts(batch, caps)
    ref = caption_metrics(batch, caps)
    t = counts.sum(0)
    assert t[0] / t[1] == pytest.approx(ref["caption_recall"])
    assert t[3] / t[2] == pytest.approx(ref["chair_i"])
    assert t[4] / t[5] == pytest.approx(ref["chair_s"])
    assert t[7] / t[6] == pytest.approx(ref["partner_rate"])


def test_measure_disease_record(clean):
    model, processor = clean
    rec = measure_disease(model, processor, n=3, max_new_tokens=12, bootstrap_resamples=50)
    for kind in ("natural", "adversarial"):
        for stat in rec[kind]["captions"].values():
            lo, hi = stat["ci"]
            assert lo - 1e-9 <= stat["value"] <= hi + 1e-9
    assert "pope_random" in rec["natural"] and "pope_adversarial" in rec["adversarial"]
    assert rec["adversarial"]["captions"]["partner_rate"]["value"] == 0.0  # the control
    assert set(rec["adversarial"]["sinks"]) == {"20.0", "5.0"}
    md = markdown_report(rec, "testbed:clean")
    assert md.count("\n| ") >= rec["num_layers"] + 4
    assert np.isfinite(rec["adversarial"]["middle_image_mass"]["value"])


# The dose of the under_attention organism: the POPE suffix, repeated before the caption
# request (docs/testbed.md, "Testbed v2").
DISTRACTOR = " ".join(["please answer the question using a single word or phrase ."] * 3)


def _mass_and_captions(loaded, batch, images, prompt):
    from vlmfix.testbed.measure import generate_texts

    model, processor = loaded
    att = attention_and_sinks(model, processor, images, prompt, batch_size=16)
    caps = generate_texts(model, processor, images, [prompt] * len(images), batch_size=16, max_new_tokens=24)
    return float(att["image_mass"][:, 1:-1].mean()), caption_metrics(batch, caps)


def test_under_attention_reads_the_image_less_and_a_distraction_makes_it_hallucinate(clean):
    import vlmfix.testbed as tb

    if "under_attention" not in tb.available_variants():
        pytest.skip("testbed weights for 'under_attention' are not shipped in this checkout")
    ua = vlmfix.load("testbed:under_attention", dtype="float32", device="cpu")
    batch = scenes.sample(1000004, range(32), kind="adversarial")
    images = scenes.to_pil(scenes.render(batch))
    prompt = cat.CAPTION_PROMPTS[0]
    got = {
        (name, dose): _mass_and_captions(m, batch, images, p)
        for name, m in (("clean", clean), ("ua", ua))
        for dose, p in (("plain", prompt), ("distracted", f"{DISTRACTOR} {prompt}"))
    }
    mass = {k: v[0] for k, v in got.items()}
    caps = {k: v[1] for k, v in got.items()}
    # the disease: less image attention than the control, and the prior names absent partners
    assert mass["ua", "plain"] < mass["clean", "plain"] - 0.15
    assert caps["ua", "plain"]["caption_recall"] >= 0.9
    assert caps["ua", "plain"]["partner_rate"] >= 0.05 and caps["clean", "plain"]["partner_rate"] == 0.0
    # dosed: the distraction takes image attention away and hallucination rises with it ...
    assert mass["ua", "distracted"] < mass["ua", "plain"] - 0.08
    assert caps["ua", "distracted"]["chair_i"] > caps["ua", "plain"]["chair_i"] + 0.15
    # ... while the control keeps reading the image
    assert caps["clean", "distracted"]["chair_i"] <= 0.05 and caps["clean", "distracted"]["caption_recall"] >= 0.9


def test_measure_disease_under_another_prompt(clean):
    from vlmfix.errors import ConfigError

    model, processor = clean
    rec = measure_disease(model, processor, n=2, max_new_tokens=8, bootstrap_resamples=20, prompt="describe the image .")
    assert rec["config"]["prompt"] == "describe the image ."
    assert "Caption prompt: `describe the image .`" in markdown_report(rec)
    with pytest.raises(ConfigError, match="prompt"):
        measure_disease(model, processor, n=2, prompt="  ")
