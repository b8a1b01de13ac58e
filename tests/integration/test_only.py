"""ONLY against a naive reference: per sample, eager attention maps, plain forwards.

The reference takes the intervention layer's last-row attention map from a stock eager
forward (``output_attentions``), rebuilds the value vectors from that layer's input hidden
state, edits the weights with explicit index lists, runs the branch through the last
layer's MLP with ``torch`` calls of its own, and combines the logits. vlmfix computes the
same inside its batched, cached forward (RowStats + ``row_output``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, tiny
from naive import eager as eager_attention
from naive import encode, forward, greedy, sample, vcd, vcd_noise

import vlmfix
from vlmfix.errors import ConfigError

STEPS = 5
VAR = dict(tau=2.0, start_layer=1, end_layer=0)  # a tau the tiny LMs reach; layer 0 untouched


def _weights(probs, ids, image_id):
    """The released code's edit of one row's attention ``probs[H, T]``, with index lists."""
    H, T = probs.shape
    image = [j for j in range(T) if int(ids[j]) == image_id]
    text = [j for j in range(1, T) if int(ids[j]) != image_id]
    out = probs.clone()
    ratio = []
    for h in range(H):
        ent = []
        for keys, empty in ((text, 0.0), (image, float("inf"))):
            a = probs[h, keys]
            a = torch.where(a > a.mean() + a.std(), torch.zeros_like(a), a)
            out[h, keys] = a
            p = a / a.sum()
            e = float(-(p * torch.log(p + 1e-6)).sum())
            ent.append(empty if e != e else e)
        ratio.append(ent[0] / ent[1])
    mean = sum(ratio) / H
    for h in range(H):
        if ratio[h] < mean:
            out[h] = 0
    return out


@torch.no_grad()
def _only_logits(model, ids, extra, tokens, *, layer=0, attached=(), cfg=None):
    cfg = cfg or vlmfix.ONLY()
    lm = model.model.language_model
    with eager_attention(model):
        ref, seq = forward(model, ids, extra, tokens, output_attentions=True, output_hidden_states=True)
    if attached:
        with vlmfix.attach(model, *attached):
            out, _ = forward(model, ids, extra, tokens, output_hidden_states=True)
    else:
        out = ref
    probs = ref.attentions[layer][0, :, -1].float()  # [H, T]
    w = _weights(probs, seq, model.config.image_token_id)
    attn = lm.layers[layer].self_attn
    H, D = probs.shape[0], attn.head_dim
    v = attn.v_proj(lm.layers[layer].input_layernorm(ref.hidden_states[layer][0]))  # [T, Hkv * D]
    v = v.view(len(seq), -1, D).transpose(0, 1)  # [Hkv, T, D]
    v = v.repeat_interleave(H // v.shape[0], dim=0)
    branch = attn.o_proj(torch.einsum("ht,htd->hd", w, v.float()).reshape(-1))
    last = lm.layers[-1]
    x = out.hidden_states[len(lm.layers) - 1][0, -1]  # input of the last decoder layer
    u = last.input_layernorm(branch) + 0.2 * x
    u = u + last.mlp(last.post_attention_layernorm(u))
    cd = model.lm_head(lm.norm(u)).float()
    main = out.logits[0, -1].float()
    tvd = float((main.softmax(-1) - cd.softmax(-1)).abs().sum())
    comb = main + cfg.alpha_pos * cd if tvd < cfg.gamma else (1 + cfg.alpha_neg) * main - cfg.alpha_neg * cd
    probs = main.softmax(-1)
    return comb.masked_fill(probs < cfg.beta * probs.max(), float("-inf"))


def _check(out, refs):
    for b, (tokens, scores) in enumerate(refs):
        assert out.token_ids[b] == tokens
        torch.testing.assert_close(out.scores[b], scores, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_matches_naive_reference_batched_with_padding(family):
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=1), PROMPTS[1:4]
    out = vlmfix.generate(model, processor, images, prompts, [vlmfix.ONLY()], max_new_tokens=STEPS, return_scores=True)
    assert len(set(out.prompt_lengths)) > 1, "prompts of different lengths exercise left padding"
    inputs = encode(processor, images, prompts)
    refs = []
    for b in range(3):
        ids, extra = sample(inputs, b)
        refs.append(greedy(lambda t, ids=ids, extra=extra: _only_logits(model, ids, extra, t), STEPS))
    _check(out, refs)
    assert 0 <= out.stats["only"]["agreeing_fraction"] <= 1 and out.stats["only"]["row_steps"] > 0


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_composes_with_var_and_vcd(family):
    """VAR edits every row (the reference attaches it to its plain forwards); VCD then
    contrasts ONLY's output with the noised-image row."""
    model, processor = tiny(family)
    images, prompts = make_images(2, seed=2), PROMPTS[1:3]
    var = vlmfix.VAR(**VAR)
    out = vlmfix.generate(
        model, processor, images, prompts, [var, vlmfix.ONLY(), vlmfix.VCD()], max_new_tokens=STEPS, return_scores=True
    )
    assert out.stats["var"]["rows_redistributed"] > 0
    inputs = encode(processor, images, prompts)
    noised = dict(inputs, pixel_values=vcd_noise(inputs["pixel_values"]))
    refs = []
    for b in range(2):
        ids, extra = sample(inputs, b)
        _, extra_noised = sample(noised, b)

        def next_logits(tokens, ids=ids, extra=extra, extra_noised=extra_noised):
            only = _only_logits(model, ids, extra, tokens, attached=(var,))
            with vlmfix.attach(model, var):
                contrast, _ = forward(model, ids, extra_noised, tokens)
            return vcd(only, contrast.logits[0, -1].float())

        refs.append(greedy(next_logits, STEPS))
    _check(out, refs)


def test_cache_and_beams():
    model, processor = tiny("llava_next")
    images, prompts = make_images(3), PROMPTS[:3]
    kw = dict(max_new_tokens=5, return_scores=True)
    a = vlmfix.generate(model, processor, images, prompts, [vlmfix.ONLY()], **kw)
    b = vlmfix.generate(model, processor, images, prompts, [vlmfix.ONLY()], use_cache=False, **kw)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    beams = vlmfix.generate(model, processor, images, prompts, [vlmfix.ONLY()], num_beams=3, max_new_tokens=5)
    assert all(len(t) >= 1 for t in beams.token_ids) and len(beams.sequence_scores) == 3


def test_validation():
    with pytest.raises(ConfigError, match="gamma=3"):
        vlmfix.ONLY(gamma=3)
    with pytest.raises(ConfigError, match="beta"):
        vlmfix.ONLY(beta=1.0)
    model, processor = tiny("llava")
    with pytest.raises(ConfigError, match="layer=3"):
        vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], [vlmfix.ONLY(layer=3)], max_new_tokens=1)
