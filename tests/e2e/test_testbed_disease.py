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
