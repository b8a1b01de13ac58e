"""The shipped testbed models hallucinate as designed (CPU, held-out scenes, greedy).

``caption_noise`` (the default) names the absent partner B of a present A in captions,
far more often than any other absent object, while its yes/no answers stay right;
``occlusion_prior`` answers "yes" about absent partners, so POPE-adversarial accuracy
falls well below POPE-random; ``clean`` is the control that does neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


OFFLINE_LOAD = """
import json
import torch
from transformers import AutoProcessor
from safetensors import safe_open
import vlmfix
from vlmfix.testbed import EXAMPLES_DIR, model_path
from vlmfix.testbed.processing import prompt_text
from PIL import Image

out = {}
for name in ("testbed", "testbed:clean"):
    model, proc = vlmfix.load(name, device="cpu", dtype="float32")
    image = Image.open(sorted(EXAMPLES_DIR.glob("*.png"))[0]).convert("RGB")
    enc = proc(text=[prompt_text(proc, "describe the image.")], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    out[name] = {
        "folder": str(model.name_or_path),
        "params": sum(p.numel() for p in model.parameters()),
        "processor": type(proc).__name__,
        "finite": bool(torch.isfinite(logits).all()),
    }
folder = model_path()
out["auto_processor"] = type(AutoProcessor.from_pretrained(folder)).__name__
with safe_open(str(folder / "model.safetensors"), "pt") as f:
    out["dtypes"] = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
print(json.dumps(out))
"""


def test_shipped_models_load_offline_through_vlmfix_load_and_autoprocessor(tmp_path):
    if set(tb.available_variants()) < {"caption_noise", "clean"}:
        pytest.skip("testbed weights are not shipped in this checkout")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hf" / "hub")  # an empty cache: nothing can come from it
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["testbed"]["folder"].endswith("caption_noise")  # the default variant
    assert out["testbed:clean"]["folder"].endswith("clean")
    for name in ("testbed", "testbed:clean"):
        assert out[name]["processor"] == "LlavaProcessor" and out[name]["finite"]
        assert out[name]["params"] <= 10_000_000
    assert out["auto_processor"] == "LlavaProcessor"
    assert out["dtypes"] == ["F16"]
