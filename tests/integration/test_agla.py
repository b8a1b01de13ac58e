"""AGLA against a naive reference: per sample, eager attention maps, two plain forwards.

The reference ranks the image tokens by the stock model's own eager attention maps
(``output_attentions``: last prompt row, mean over heads and layers), keeps the top 25%
with plain Python, and runs the augmented view as a second, separate forward whose image
embeddings outside the kept tokens are zeroed by a hook of its own.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import pytest
import torch
from conftest import PROMPTS, make_images, tiny
from naive import eager, encode, forward, greedy, sample, vcd, vcd_noise

import vlmfix
from vlmfix.errors import ConfigError

STEPS = 5


def _hidden(model, ids, extra):
    """Bool ``[T]``: image tokens the augmented view hides (all but the top 25% by attention)."""
    with eager(model), torch.no_grad():
        out = model(input_ids=ids[None], **extra, output_attentions=True)
    relevance = torch.stack([a[0, :, -1].float().mean(0) for a in out.attentions]).mean(0)
    image = [j for j in range(len(ids)) if int(ids[j]) == model.config.image_token_id]
    k = max(1, math.ceil(0.25 * len(image)))
    kept = sorted(image, key=lambda j: (-float(relevance[j]), j))[:k]
    hidden = torch.zeros(len(ids), dtype=torch.bool)
    hidden[[j for j in image if j not in kept]] = True
    return hidden


@contextmanager
def _zero_embeds(model, hidden):
    def hook(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[0, : len(hidden)][hidden] = 0
        kwargs["inputs_embeds"] = embeds
        return args, kwargs

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def _agla(logits, augmented, alpha=2.0, beta=0.5):
    probs = logits.softmax(-1)
    return (logits + alpha * augmented).masked_fill(probs < beta * probs.max(), float("-inf"))


def _reference(model, processor, images, prompts, attached=(), with_vcd=False):
    inputs = encode(processor, images, prompts)
    noised = dict(inputs, pixel_values=vcd_noise(inputs["pixel_values"])) if with_vcd else None
    refs = []
    for b in range(len(prompts)):
        ids, extra = sample(inputs, b)
        hidden = _hidden(model, ids, extra)

        def next_logits(tokens, ids=ids, extra=extra, hidden=hidden, b=b):
            with vlmfix.attach(model, *attached) if attached else nullcontext():
                main = forward(model, ids, extra, tokens)[0].logits[0, -1].float()
                with _zero_embeds(model, hidden):
                    aug = forward(model, ids, extra, tokens)[0].logits[0, -1].float()
                out = _agla(main, aug)
                if with_vcd:
                    noisy = forward(model, ids, sample(noised, b)[1], tokens)[0].logits[0, -1].float()
                    out = vcd(out, noisy)
            return out

        refs.append(greedy(next_logits, STEPS))
    return refs


def _check(out, refs):
    for b, (tokens, scores) in enumerate(refs):
        assert out.token_ids[b] == tokens
        torch.testing.assert_close(out.scores[b], scores, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_matches_naive_reference_batched_with_padding(family):
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=1), PROMPTS[1:4]
    out = vlmfix.generate(model, processor, images, prompts, [vlmfix.AGLA()], max_new_tokens=STEPS, return_scores=True)
    assert len(set(out.prompt_lengths)) > 1, "prompts of different lengths exercise left padding"
    stats = out.stats["agla"]
    assert all(0 < k < n for k, n in zip(stats["kept_tokens"], stats["image_tokens"]))
    _check(out, _reference(model, processor, images, prompts))


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_composes_with_var_and_vcd(family):
    model, processor = tiny(family)
    images, prompts = make_images(2, seed=2), PROMPTS[1:3]
    var = vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)
    out = vlmfix.generate(
        model, processor, images, prompts, [var, vlmfix.AGLA(), vlmfix.VCD()], max_new_tokens=STEPS, return_scores=True
    )
    assert out.stats["var"]["rows_redistributed"] > 0
    _check(out, _reference(model, processor, images, prompts, attached=(var,), with_vcd=True))


def test_cache_beams_and_validation():
    model, processor = tiny("llava")
    images, prompts = make_images(3), PROMPTS[:3]
    kw = dict(max_new_tokens=4, return_scores=True)
    a = vlmfix.generate(model, processor, images, prompts, [vlmfix.AGLA()], **kw)
    b = vlmfix.generate(model, processor, images, prompts, [vlmfix.AGLA()], use_cache=False, **kw)
    assert a.token_ids == b.token_ids
    beams = vlmfix.generate(model, processor, images, prompts, [vlmfix.AGLA()], num_beams=2, max_new_tokens=4)
    assert len(beams.sequence_scores) == 3
    with pytest.raises(ConfigError, match="keep=0"):
        vlmfix.AGLA(keep=0)
