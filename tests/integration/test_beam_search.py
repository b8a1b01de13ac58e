"""Beam search in vlmfix.generate: stock transformers beam search, and naive references.

* With no method attached the tokens and beam scores equal stock
  ``model.generate(num_beams=...)`` on the three tiny families, batched with left padding,
  with an extra EOS id that the tiny models do produce (so hypotheses finish early, the
  early-stopping rules and the K-candidates rule are exercised).
* An attention method sees beams as rows: vlmfix's cached beam search equals stock beam
  search *without a cache* under ``attach`` (every step a full forward, so no per-row state
  has to follow the beams; VAR's sink flags of generated positions must follow them in the
  cached run).
* A contrastive method combines per beam: VCD with beams equals a naive beam search
  written here, one hypothesis at a time, each step two separate batch-1 forwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import pytest
import torch
from conftest import PROMPTS, make_images, tiny
from naive import naive_beam

import vlmfix
from vlmfix.errors import ConfigError
from vlmfix.generation import prepare_inputs

# A token each tiny model generates often, used as a second EOS id.
EXTRA_EOS = {"llava": 42, "llava_next": 42, "llava_onevision": 82}


@contextmanager
def extra_eos(model, token):
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [2, token]
    try:
        yield
    finally:
        model.generation_config.eos_token_id = before


def _stock(model, processor, images, prompts, **kw):
    inputs = prepare_inputs(processor, images, prompts)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    L = inputs["input_ids"].shape[1]
    tokens = []
    for row in out.sequences[:, L:].tolist():
        end = next((k for k, t in enumerate(row) if t in eos), None)
        tokens.append(row if end is None else row[: end + 1])
    return tokens, out.sequences_scores.tolist()


CASES = [
    dict(num_beams=3, max_new_tokens=8),
    dict(num_beams=4, max_new_tokens=8, early_stopping=True),
    dict(num_beams=3, max_new_tokens=8, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=2, max_new_tokens=8, length_penalty=-1.0),
]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_equals_stock_beam_search(family):
    model, processor = tiny(family)
    images, prompts = make_images(4), PROMPTS[:4]
    for i, kw in enumerate(CASES):
        eos = EXTRA_EOS[family] if i else None  # the first case keeps the model's own EOS
        with extra_eos(model, eos) if eos else nullcontext():
            ref_tokens, ref_scores = _stock(model, processor, images, prompts, **kw)
            out = vlmfix.generate(model, processor, images, prompts, **kw)
        assert len(set(out.prompt_lengths)) > 1, "prompts of different lengths exercise left padding"
        assert out.token_ids == ref_tokens, kw
        assert out.sequence_scores == pytest.approx(ref_scores, abs=1e-4), kw
        if eos and kw.get("early_stopping") != "never":
            assert any(len(t) < kw["max_new_tokens"] for t in ref_tokens), "some hypothesis finished early"


def test_one_beam_is_greedy_and_beam_scores_are_logprobs():
    model, processor = tiny("llava")
    images, prompts = make_images(3), PROMPTS[:3]
    greedy = vlmfix.generate(model, processor, images, prompts, max_new_tokens=6, return_scores=True)
    assert greedy.sequence_scores is None
    beam = vlmfix.generate(model, processor, images, prompts, max_new_tokens=6, num_beams=3, return_scores=True)
    for ids, scores, total in zip(beam.token_ids, beam.scores, beam.sequence_scores):
        # the returned per-step logits are the answer's own: its score is their log-prob sum
        logp = scores.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum()
        assert total == pytest.approx(float(logp) / len(ids), abs=1e-4)


SINK_TAU = 2.0


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_attention_method_sees_beams_as_rows(family):
    """VAR's sink flags of generated positions follow their beams (``reorder_rows``)."""
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=2), PROMPTS[1:4]
    var = vlmfix.VAR(tau=SINK_TAU, start_layer=1, end_layer=0)
    kw = dict(num_beams=3, max_new_tokens=7)
    out = vlmfix.generate(model, processor, images, prompts, [var], **kw)
    plain = vlmfix.generate(model, processor, images, prompts, **kw)
    assert out.stats["var"]["rows_redistributed"] > 0
    with vlmfix.attach(model, var):
        ref_tokens, ref_scores = _stock(model, processor, images, prompts, use_cache=False, **kw)
    assert out.token_ids == ref_tokens
    assert out.sequence_scores == pytest.approx(ref_scores, abs=1e-4)
    assert out.sequence_scores != pytest.approx(plain.sequence_scores, abs=1e-4)


# --------------------------------------------------------------------------- naive VCD beams
def _vcd_noise(pixels, generator):
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[500].item()
    return math.sqrt(abar) * pixels + math.sqrt(1 - abar) * torch.randn(pixels.shape, generator=generator)


def _forward(model, inputs, b, tokens):
    """Next-token logits of sample ``b`` alone (padding removed), prompt + ``tokens``, no cache."""
    keep = inputs["attention_mask"][b].bool()
    ids = torch.cat([inputs["input_ids"][b][keep], torch.tensor(tokens, dtype=torch.long)])[None]
    extra = {k: v[b : b + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits[0, -1].float()


def _vcd(logits, contrast, alpha=1.0, beta=0.1):
    out = (1 + alpha) * logits - alpha * contrast
    probs = logits.softmax(-1)
    return out.masked_fill(probs < beta * probs.max(), float("-inf"))


def test_vcd_combines_per_beam():
    family = "llava"
    model, processor = tiny(family)
    images, prompts = make_images(2, seed=1), PROMPTS[1:3]
    eos = EXTRA_EOS[family]
    with extra_eos(model, eos):
        out = vlmfix.generate(
            model, processor, images, prompts, [vlmfix.VCD()], num_beams=3, max_new_tokens=6, return_scores=True
        )
    main = prepare_inputs(processor, images, prompts)
    contrast = dict(main, pixel_values=_vcd_noise(main["pixel_values"], torch.Generator().manual_seed(0)))
    for b in range(2):

        def next_logits(tokens, b=b):
            return _vcd(_forward(model, main, b, tokens), _forward(model, contrast, b, tokens))

        tokens, score, hist = naive_beam(next_logits, 3, 6, {2, eos})
        assert out.token_ids[b] == tokens
        assert out.sequence_scores[b] == pytest.approx(score, abs=1e-4)
        torch.testing.assert_close(out.scores[b], hist, atol=2e-4, rtol=1e-4)


def test_validation():
    model, processor = tiny("llava")
    with pytest.raises(ConfigError, match="num_beams=0"):
        vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], num_beams=0)
    with pytest.raises(ConfigError, match="do_sample=True"):
        vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], num_beams=2, do_sample=True)
    with pytest.raises(ConfigError, match="early_stopping"):
        vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], num_beams=2, early_stopping="sometimes")


def test_cli_num_beams_option():
    import argparse

    from vlmfix.cli_common import add_model_options, generation_kwargs

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    assert "num_beams" not in generation_kwargs(parser.parse_args([]))  # greedy records stay as they were
    assert generation_kwargs(parser.parse_args(["--num-beams", "5"]))["num_beams"] == 5
