"""Contrastive decoding (VCD, ICD, M3ID, AvisC, PAI-CFG) against naive two-call references.

Each reference runs the stock model twice per step, as the papers' code does: once on the
main input and once on the contrast input, each batch with its own padding and its own
KV cache, and combines the logits in this file's own code. vlmfix must give the same
tokens and logits from its single batch-fused forward per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import PROMPTS, make_images, tiny
from transformers import DynamicCache

import vlmfix
from vlmfix._compat import cache_kwarg
from vlmfix.attachment import _attn_snapshot
from vlmfix.errors import ConfigError
from vlmfix.generation import sample_next
from vlmfix.methods.base import Method, MethodConfig

STEPS = 6
SAMPLING = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
GREEDY = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=0)


# --------------------------------------------------------------------------- reference
def _template(processor, prompt, *, image=True, system=None):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    conv = [{"role": "user", "content": content}]
    if system is not None:
        conv.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def _encode(processor, images, texts):
    kw = dict(text=texts, return_tensors="pt", padding=True, padding_side="left")
    return dict(processor(images=images, **kw) if images is not None else processor(**kw))


class _Stream:
    """One batch decoded step by step with the stock model and its own cache (or, with
    ``use_cache=False``, the whole sequence recomputed each step)."""

    def __init__(self, model, inputs, embeds_edit=None, use_cache=True):
        self.model, self.inputs, self.embeds_edit, self.use_cache = model, inputs, embeds_edit, use_cache
        self.ids = inputs["input_ids"]
        self.mask = inputs["attention_mask"]
        self.pos = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        self.cache = DynamicCache(config=model.config.get_text_config()) if use_cache else None
        self.step = 0

    def logits(self):
        if self.step == 0 or not self.use_cache:
            extra = {k: v for k, v in self.inputs.items() if k not in ("input_ids", "attention_mask")}
            if self.embeds_edit is not None:
                extra = {"inputs_embeds": self.embeds_edit(self.ids, extra)}
            else:
                extra["input_ids"] = self.ids
            out = self.model(
                attention_mask=self.mask,
                position_ids=self.pos,
                **{cache_kwarg(self.model): self.cache},
                use_cache=self.use_cache,
                **extra,
            )
        else:
            out = self.model(
                input_ids=self.ids[:, -1:],
                attention_mask=self.mask,
                position_ids=self.pos[:, -1:],
                **{cache_kwarg(self.model): self.cache},
            )
        self.step += 1
        return out.logits[:, -1].float()

    def append(self, tokens):
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], dim=1)
        self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], dim=1)


def _naive(model, main, contrast, combine, policy, generator):
    """Decode ``STEPS`` tokens; returns ``(tokens[B, T], combined logits[B, T, V])``."""
    tokens, scores = [], []
    with torch.no_grad():
        for step in range(STEPS):
            logits = combine(step, main.logits(), contrast.logits())
            nxt = sample_next(logits, generator=generator, **policy)
            main.append(nxt)
            contrast.append(nxt)
            tokens.append(nxt)
            scores.append(logits)
    return torch.stack(tokens, 1), torch.stack(scores, 1)


def _vcd_noise(pixels, generator):
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[500].item()
    return math.sqrt(abar) * pixels + math.sqrt(1 - abar) * torch.randn(pixels.shape, generator=generator)


def _cutoff(main, out, beta=0.1):
    probs = main.softmax(-1)
    return out.masked_fill(probs < beta * probs.max(-1, keepdim=True).values, float("-inf"))


def _vcd_combine(step, logits, contrast):
    return _cutoff(logits, 2 * logits - contrast)


def _m3id_combine(step, logits, uncond):
    gamma = math.exp(-0.02 * (step + 1))
    lc, lu = logits.log_softmax(-1), uncond.log_softmax(-1)
    return lc + (1 - gamma) / gamma * (lc - lu)


def _cfg_combine(step, logits, uncond):
    lc, lu = logits.log_softmax(-1), uncond.log_softmax(-1)
    return _cutoff(logits, 1.1 * (lc - lu) + lu)


def _avisc_edit(model, main_inputs):
    """Blind tokens from the stock model's own attention maps (eager, output_attentions)."""
    ids = main_inputs["input_ids"]
    image = ids == model.config.image_token_id
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    before = _attn_snapshot(model)
    model.set_attn_implementation("eager")
    try:
        mask = main_inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            out = model(**main_inputs, position_ids=pos, output_attentions=True)
    finally:
        hook.remove()
        model.set_attn_implementation(before[""])
    per_layer = torch.stack([a[:, :, -1].float().mean(1) for a in out.attentions]) * image  # [layers, B, L]
    zero = torch.zeros_like(image)
    for b in range(ids.shape[0]):
        mass = per_layer[:, b].sum(-1)
        order = sorted(range(len(mass)), key=lambda i: -float(mass[i]))
        kept, total = [], 0.0
        for i in order:
            kept.append(i)
            total += float(mass[i])
            if total >= 0.5 * float(mass.sum()):
                break
        a = per_layer[kept, b].sum(0)[image[b]]
        blind = a >= a.mean() + a.std()
        z = torch.zeros(int(image[b].sum()), dtype=torch.bool)
        z[~blind] = True
        zero[b, image[b]] = z
    embeds = captured["embeds"].masked_fill(zero[:, :, None], 0)
    return lambda ids, extra: embeds


def _reference(method, model, processor, images, prompts, policy, seed, use_cache=True):
    generator = torch.Generator().manual_seed(seed)
    main_texts = [_template(processor, p) for p in prompts]
    main = _encode(processor, images, main_texts)
    edit = None
    if method == "vcd":
        contrast = dict(main, pixel_values=_vcd_noise(main["pixel_values"], generator))
        combine = _vcd_combine
    elif method == "icd":
        texts = [_template(processor, p, system="You are a confused object detector.") for p in prompts]
        contrast, combine = _encode(processor, images, texts), _vcd_combine
    elif method in ("m3id", "pai_cfg"):
        contrast = _encode(processor, None, [_template(processor, p, image=False) for p in prompts])
        combine = _m3id_combine if method == "m3id" else _cfg_combine
    elif method == "avisc":
        contrast, combine, edit = dict(main), _vcd_combine, _avisc_edit(model, main)
    streams = _Stream(model, main, use_cache=use_cache), _Stream(model, contrast, edit, use_cache=use_cache)
    return _naive(model, *streams, combine, policy, generator)


def _assert_same(out, ref_tokens, ref_scores, n):
    assert len(out.token_ids) == len(out.texts) == len(out.scores) == len(out.prompt_lengths) == n
    for i, ids in enumerate(out.token_ids):
        assert ids == ref_tokens[i, : len(ids)].tolist()
        assert len(ids) == STEPS or ids[-1] == 2
        torch.testing.assert_close(out.scores[i], ref_scores[i, : len(ids)], atol=2e-4, rtol=1e-4)


METHODS = ["vcd", "icd", "m3id", "avisc", "pai_cfg"]


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "n,policy,seed",
    [(1, GREEDY, 0), (3, GREEDY, 0), (1, SAMPLING, 5), (3, SAMPLING, 7)],
    ids=["greedy-b1", "greedy-b3", "sample-b1", "sample-b3"],
)
def test_matches_naive_two_call_reference(family, method, n, policy, seed):
    model, processor = tiny(family)
    images, prompts = make_images(n, seed=1), PROMPTS[1 : 1 + n]
    out = vlmfix.generate(
        model,
        processor,
        images,
        prompts,
        [vlmfix.methods.get(method)()],
        max_new_tokens=STEPS,
        return_scores=True,
        seed=seed,
        **policy,
    )
    if n > 1:
        assert len(set(out.prompt_lengths)) > 1, "prompts of different lengths exercise left padding"
    ref_tokens, ref_scores = _reference(method, model, processor, images, prompts, policy, seed)
    _assert_same(out, ref_tokens, ref_scores, n)


@pytest.mark.parametrize("method", METHODS)
def test_cache_on_equals_cache_off(method):
    model, processor = tiny("llava")
    kw = dict(max_new_tokens=5, return_scores=True)
    cfg = [vlmfix.methods.get(method)()]
    a = vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], cfg, **kw)
    b = vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], cfg, use_cache=False, **kw)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_deterministic_and_noise_is_seeded():
    model, processor = tiny("llava_next")
    kw = dict(max_new_tokens=8, do_sample=True, return_scores=True)
    imgs = make_images(3)
    a = vlmfix.generate(model, processor, imgs, PROMPTS[:3], [vlmfix.VCD()], seed=3, **kw)
    b = vlmfix.generate(model, processor, imgs, PROMPTS[:3], [vlmfix.VCD()], seed=3, **kw)
    c = vlmfix.generate(model, processor, imgs, PROMPTS[:3], [vlmfix.VCD()], seed=4, **kw)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x, y)
    # another seed draws other noise: the first step's logits already differ
    assert not torch.equal(a.scores[0][0], c.scores[0][0])


def test_branch_rows_never_leak_and_are_exposed():
    model, processor = tiny("llava")
    seen = []

    @dataclass(frozen=True)
    class _Spy(MethodConfig):
        name: ClassVar[str] = "_rows_spy"

        def build(self):
            class _M(Method):
                def on_forward(self, handle, kwargs):
                    seen.append((handle.controller.rows, kwargs["input_ids"].shape[0]))

            return _M(self)

    lm = model.model.language_model
    hooks_before = (len(lm._forward_pre_hooks), len(model._forward_pre_hooks))
    out = vlmfix.generate(
        model, processor, make_images(2), PROMPTS[:2], [_Spy(), vlmfix.VCD(), vlmfix.AvisC()], max_new_tokens=3
    )
    assert len(out.token_ids) == len(out.texts) == len(out.prompt_lengths) == 2
    assert all(len(ids) <= 3 for ids in out.token_ids)
    probe, *steps = seen
    assert probe[0].probing and probe[1] == 2  # AvisC's main-rows-only probe forward
    rows, batch = steps[0]
    assert rows.num_samples == 2 and rows.num_rows == batch == 6 and not rows.probing
    assert rows.branches == (("vcd", "noised_image"), ("avisc", "blind_tokens_only"))
    assert rows.is_main().tolist() == [True, True, False, False, False, False]
    assert rows.sample_index().tolist() == [0, 1, 0, 1, 0, 1]
    assert all(b == 6 for _, b in steps)
    assert (len(lm._forward_pre_hooks), len(model._forward_pre_hooks)) == hooks_before
    assert vlmfix.attachment.active_handle(model) is None


def test_vcd_composes_with_baseline():
    model, processor = tiny("llava_next")
    kw = dict(max_new_tokens=5, return_scores=True, do_sample=True, seed=5)
    a = vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], [vlmfix.VCD()], **kw)
    b = vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], [vlmfix.Baseline(), vlmfix.VCD()], **kw)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x, y)
    assert b.stats == {"baseline": {}, "vcd": {}}


@dataclass(frozen=True)
class _BoostImage(MethodConfig):
    """Test-only attention method: PAI-like z += 0.5 |z| on image keys, every row."""

    name: ClassVar[str] = "_boost_image"
    order: ClassVar[int] = 200

    def build(self):
        class _M(Method):
            def contribute(self, call, plan):
                plan.add_score_edit(call.layout.image_mask[:, None, :] * 0.5)  # every row (score_rows None)

        return _M(self)


# VAR with a tau the tiny LMs reach (their |RMSNorm(x)[d]| <= sqrt(64) = 8), every layer
ATTENTION = {
    "boost_image": lambda: _BoostImage(),
    "var": lambda: vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0),
}


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
@pytest.mark.parametrize("attention", list(ATTENTION))
def test_vcd_with_an_attention_method_matches_attached_two_call_reference(family, attention):
    """Attention methods apply to branch rows too: the reference attaches the method to
    both of its model calls (without a cache, as the attached layout follows one batch)."""
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=2), PROMPTS[1:4]
    make = ATTENTION[attention]
    out = vlmfix.generate(
        model, processor, images, prompts, [make(), vlmfix.VCD()], max_new_tokens=STEPS, return_scores=True
    )
    plain = vlmfix.generate(model, processor, images, prompts, [vlmfix.VCD()], max_new_tokens=STEPS, return_scores=True)
    assert any(not torch.allclose(a, b) for a, b in zip(out.scores, plain.scores))
    if attention == "var":
        assert out.stats["var"]["rows_redistributed"] > 0
    with vlmfix.attach(model, make()):
        ref_tokens, ref_scores = _reference("vcd", model, processor, images, prompts, GREEDY, 0, use_cache=False)
    _assert_same(out, ref_tokens, ref_scores, 3)


def test_avisc_reports_blind_tokens():
    model, processor = tiny("llava")
    out = vlmfix.generate(model, processor, make_images(2), PROMPTS[:2], [vlmfix.AvisC()], max_new_tokens=2)
    stats = out.stats["avisc"]
    assert len(stats["blind_tokens"]) == 2 and all(0 < n < 16 for n in stats["blind_tokens"])
    assert all(layers for layers in stats["layers"])


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="beta=1.5"):
        vlmfix.VCD(beta=1.5)
    with pytest.raises(ConfigError, match="noise_step=1000"):
        vlmfix.VCD(noise_step=1000)
    with pytest.raises(ConfigError, match="disturbance"):
        vlmfix.ICD(disturbance=" ")
    with pytest.raises(ConfigError, match="decay"):
        vlmfix.M3ID(decay=0)
    with pytest.raises(ConfigError, match="layer_share"):
        vlmfix.AvisC(layer_share=0)
    with pytest.raises(ConfigError, match="gamma"):
        vlmfix.PAICFG(gamma=-1)


def test_icd_needs_the_chat_template():
    model, processor = tiny("llava")
    raw = _template(processor, PROMPTS[0])
    with pytest.raises(ConfigError, match="apply_chat_template=False"):
        vlmfix.generate(model, processor, make_images(1), [raw], [vlmfix.ICD()], apply_chat_template=False)
    # image-free branches strip the image token from raw prompts instead
    out = vlmfix.generate(
        model, processor, make_images(1), [raw], [vlmfix.M3ID()], apply_chat_template=False, max_new_tokens=2
    )
    assert len(out.token_ids) == 1
