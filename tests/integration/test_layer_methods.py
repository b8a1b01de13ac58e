"""Hidden-state and layer-contrast methods (DeCo, VISTA) against naive references.

The references drive the stock model step by step with plain forwards and read every
layer's hidden state from transformers' own ``output_hidden_states`` (or the test's own
forward hooks), with their own padding and KV cache per input; the methods' maths is
written here again from the papers / released code, per sample where the released code
is per sample. vlmfix must give the same tokens and logits from one forward per step.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import FAMILIES, PROMPTS, make_images, tiny
from transformers import DynamicCache

import vlmfix
from vlmfix import _compat
from vlmfix.attachment import _attn_snapshot, active_handle
from vlmfix.errors import ConfigError
from vlmfix.generation import sample_next

STEPS = 5
GREEDY = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=0)
SAMPLING = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)


# --------------------------------------------------------------------------- plain decoding
def _template(processor, prompt, image=True, system=None):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    conv = [{"role": "user", "content": content}]
    if system is not None:
        conv.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def _encode(processor, images, prompts, image=True, system=None):
    texts = [_template(processor, p, image, system) for p in prompts]
    kw = dict(text=texts, return_tensors="pt", padding=True, padding_side="left")
    return dict(processor(images=images, **kw) if image else processor(**kw))


class _Stream:
    """One batch decoded with plain forwards and its own KV cache (or none)."""

    def __init__(self, model, inputs, use_cache=True):
        self.model, self.inputs, self.use_cache = model, inputs, use_cache
        self.ids, self.mask = inputs["input_ids"], inputs["attention_mask"]
        self.pos = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        self.cache = DynamicCache(config=model.config.get_text_config()) if use_cache else None
        self.step = 0

    def forward(self):
        """The step's output (``logits``, ``hidden_states`` of every layer)."""
        kw = dict(attention_mask=self.mask, use_cache=self.use_cache)
        kw[_compat.cache_kwarg(self.model)] = self.cache  # `cache` from 5.24 on
        if self.step == 0 or not self.use_cache:
            extra = {k: v for k, v in self.inputs.items() if k not in ("input_ids", "attention_mask")}
            out = self.model(input_ids=self.ids, position_ids=self.pos, output_hidden_states=True, **kw, **extra)
        else:
            out = self.model(input_ids=self.ids[:, -1:], position_ids=self.pos[:, -1:], output_hidden_states=True, **kw)
        self.step += 1
        return out

    def append(self, tokens):
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens[:, None])], 1)
        self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], 1)


def _layer_logits(model, out, layer, norm=True):
    """Logits of decoder layer ``layer``'s output at the last position (fp32)."""
    hs = out.hidden_states
    if layer == len(hs) - 2:  # transformers' last entry is already normed
        return out.logits[:, -1].float()
    h = hs[layer + 1][:, -1]
    if norm:
        h = model.model.language_model.norm(h)
    return model.lm_head(h).float()


def _decode(streams, combine, policy, generator, steps=STEPS):
    """Run every stream in lock step; ``combine(step, outs) -> logits [B, V]``."""
    tokens, scores = [], []
    with torch.no_grad():
        for step in range(steps):
            logits = combine(step, [s.forward() for s in streams])
            nxt = sample_next(logits, generator=generator, **policy)
            for s in streams:
                s.append(nxt)
            tokens.append(nxt)
            scores.append(logits)
    return torch.stack(tokens, 1), torch.stack(scores, 1)


def _assert_same(out, ref_tokens, ref_scores):
    assert len(out.token_ids) == ref_tokens.shape[0]
    for i, ids in enumerate(out.token_ids):
        assert ids == ref_tokens[i, : len(ids)].tolist()
        torch.testing.assert_close(out.scores[i], ref_scores[i, : len(ids)], atol=2e-4, rtol=1e-4)


def _vcd(main_inputs, generator):
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[500].item()
    px = main_inputs["pixel_values"]
    noised = math.sqrt(abar) * px + math.sqrt(1 - abar) * torch.randn(px.shape, generator=generator)
    return dict(main_inputs, pixel_values=noised)


def _vcd_combine(logits, contrast):
    probs = logits.softmax(-1)
    out = 2 * logits - contrast
    return out.masked_fill(probs < 0.1 * probs.max(-1, keepdim=True).values, float("-inf"))


# --------------------------------------------------------------------------- DeCo reference
def _deco_row(final, early_by_layer, alpha=0.6, top_k=20, top_p=0.9):
    """DeCo for one row, as the released code does it (batch size 1)."""
    probs = final.softmax(-1)
    cand_p, cand_ids = probs.topk(min(top_k, probs.shape[-1]))
    cut = min(int(torch.searchsorted(cand_p.cumsum(-1), torch.tensor(top_p), right=False)) + 1, top_k)
    cand_ids = cand_ids[:cut]
    layers = list(early_by_layer)
    stacked = torch.stack([early_by_layer[i] for i in layers]).softmax(-1)[:, cand_ids]  # [layers, cand]
    flat = int(stacked.argmax())
    p_star = float(stacked.max())
    chosen = early_by_layer[layers[flat // stacked.shape[1]]]
    out = final + alpha * p_star * chosen
    keep = torch.zeros_like(final, dtype=torch.bool)
    keep[cand_ids] = True
    return out.masked_fill(~keep, float("-inf"))


def _deco(model, out, logits, layers, **kw):
    early = {i: _layer_logits(model, out, i) for i in layers}
    return torch.stack([_deco_row(logits[b], {i: e[b] for i, e in early.items()}, **kw) for b in range(len(logits))])


def _deco_reference(model, processor, images, prompts, layers, policy, seed, with_vcd=False, use_cache=True, **deco):
    generator = torch.Generator().manual_seed(seed)
    main = _encode(processor, images, prompts)
    streams = [_Stream(model, main, use_cache)]
    if with_vcd:
        streams.append(_Stream(model, _vcd(main, generator), use_cache))

    def combine(step, outs):
        logits = outs[0].logits[:, -1].float()
        if with_vcd:
            logits = _vcd_combine(logits, outs[1].logits[:, -1].float())
        return _deco(model, outs[0], logits, layers, **deco)

    return _decode(streams, combine, policy, generator)


# The tiny models' distributions are nearly flat (max p ~ 0.01), so the paper's alpha moves
# logits by ~1e-3: large alphas and small top_p make every part of the maths visible.
DECO_CASES = {
    "paper": dict(alpha=0.6, top_k=20, top_p=0.9),
    "top-p-cut": dict(alpha=50.0, top_k=20, top_p=0.1),
    "top-k-cut": dict(alpha=50.0, top_k=5, top_p=0.9),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "case,n,policy,seed,layers",
    [
        ("paper", 3, GREEDY, 0, (0, 1, 2, 3)),
        ("top-p-cut", 3, GREEDY, 0, (0, 1, 2, 3)),
        ("top-p-cut", 3, SAMPLING, 4, (1, 3)),
        ("top-k-cut", 1, GREEDY, 0, (1, 2)),
    ],
    ids=["paper-greedy-b3-all-layers", "top-p-cut-greedy-b3-all-layers", "top-p-cut-sample-b3", "top-k-cut-greedy-b1"],
)
def test_deco_matches_naive(family, case, n, policy, seed, layers):
    model, processor = tiny(family)
    images, prompts = make_images(n, seed=1), PROMPTS[1 : 1 + n]
    deco = DECO_CASES[case]
    out = vlmfix.generate(
        model,
        processor,
        images,
        prompts,
        [vlmfix.DeCo(layers=layers, **deco)],
        max_new_tokens=STEPS,
        return_scores=True,
        seed=seed,
        **policy,
    )
    if n > 1:
        assert len(set(out.prompt_lengths)) > 1, "prompts of different lengths exercise left padding"
    ref_tokens, ref_scores = _deco_reference(model, processor, images, prompts, layers, policy, seed, **deco)
    _assert_same(out, ref_tokens, ref_scores)
    # one selected layer per row and step (finished rows included)
    assert sum(out.stats["deco"]["selected_layers"].values()) == n * max(len(t) for t in out.token_ids)


def test_deco_default_layers_scale_to_depth_and_differ_from_plain():
    model, processor = tiny("llava_next")
    images, prompts = make_images(3, seed=2), PROMPTS[:3]
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    out = vlmfix.generate(model, processor, images, prompts, [vlmfix.DeCo()], **kw)
    # 19..27 of 32 layers on a 4-layer LM: floor(i * 4 / 32) = {2, 3}
    assert set(out.stats["deco"]["selected_layers"]) == {2, 3}
    ref_tokens, ref_scores = _deco_reference(model, processor, images, prompts, (2, 3), GREEDY, 0)
    _assert_same(out, ref_tokens, ref_scores)
    plain = vlmfix.generate(model, processor, images, prompts, [], **kw)
    assert any(not torch.allclose(a, b) for a, b in zip(out.scores, plain.scores))


def test_deco_batch_equals_per_sample_and_cache_off():
    model, processor = tiny("llava_onevision")
    images, prompts = make_images(3, seed=3), PROMPTS[:3]
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    cfg = [vlmfix.DeCo(layers=(1, 2))]
    batch = vlmfix.generate(model, processor, images, prompts, cfg, **kw)
    no_cache = vlmfix.generate(model, processor, images, prompts, cfg, use_cache=False, **kw)
    assert batch.token_ids == no_cache.token_ids
    for i in range(3):
        single = vlmfix.generate(model, processor, images[i : i + 1], prompts[i : i + 1], cfg, **kw)
        assert single.token_ids[0] == batch.token_ids[i]
        torch.testing.assert_close(single.scores[0], batch.scores[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(no_cache.scores[i], batch.scores[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_deco_with_vcd_matches_naive_composition(family):
    """VCD combines first (order 300), DeCo corrects the combined logits with the main rows'
    early-exit logits (order 310)."""
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=4), PROMPTS[1:4]
    cfg = [vlmfix.DeCo(layers=(1, 2)), vlmfix.VCD()]
    out = vlmfix.generate(model, processor, images, prompts, cfg, max_new_tokens=STEPS, return_scores=True)
    ref_tokens, ref_scores = _deco_reference(model, processor, images, prompts, (1, 2), GREEDY, 0, with_vcd=True)
    _assert_same(out, ref_tokens, ref_scores)


def test_deco_with_var_matches_naive_attached():
    """VAR edits the attention of the forward that also yields DeCo's hidden states: the
    reference attaches VAR to its plain forwards (no cache: the attached layout follows
    one batch)."""
    model, processor = tiny("llava")
    images, prompts = make_images(3, seed=5), PROMPTS[1:4]
    var = vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)
    out = vlmfix.generate(
        model,
        processor,
        images,
        prompts,
        [var, vlmfix.DeCo(layers=(1, 2))],
        max_new_tokens=STEPS,
        return_scores=True,
    )
    assert out.stats["var"]["rows_redistributed"] > 0
    with vlmfix.attach(model, var):
        ref_tokens, ref_scores = _deco_reference(model, processor, images, prompts, (1, 2), GREEDY, 0, use_cache=False)
    _assert_same(out, ref_tokens, ref_scores)


# --------------------------------------------------------------------------- VISTA reference
def _last_outputs(model, inputs):
    """Every decoder layer's output at the last position, read by the test's own hooks in
    one plain forward (the released code's ForwardTracer)."""
    got = {}
    layers = model.model.language_model.layers

    def keep(i):
        return lambda module, args, out: got.__setitem__(i, out[:, -1].float())

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            _Stream(model, inputs, use_cache=False).forward()
    finally:
        for h in hooks:
            h.remove()
    return got


def _steering_hooks(model, vsv, lam):
    """The released VSVLayer after every MLP, one row at a time (row b uses vsv[i][b])."""

    def make(i):
        def hook(module, args, x):
            out = []
            for b in range(x.shape[0]):
                xb, v = x[b].float(), vsv[i][b]
                sim = 1.0 + torch.clamp(torch.nn.functional.cosine_similarity(xb, -v[None], dim=-1), min=0)
                # F.normalize's eps (1e-12) matters: padded positions have an all-zero MLP output
                y = lam * sim[:, None] * (v / v.norm().clamp_min(1e-12))
                xn = xb / xb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                z = xn + y
                out.append(z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12) * xb.norm(dim=-1, keepdim=True))
            return torch.stack(out).to(x.dtype)

        return hook

    return [layer.mlp.register_forward_hook(make(i)) for i, layer in enumerate(model.model.language_model.layers)]


def _sla(model, out, layers, alpha):
    early = torch.stack([_layer_logits(model, out, i, norm=False) for i in layers]).mean(0)
    return alpha * early + (1 - alpha) * out.logits[:, -1].float()


def _vista_reference(
    model, processor, images, prompts, *, lam, alpha, layers, policy, seed, with_vcd=False, use_cache=True, attached=()
):
    """VISTA the naive way. ``attached`` methods act while decoding, not in the two readings
    of the steering vector (measurements are not edits: vlmfix's probe runs VISTA alone)."""
    generator = torch.Generator().manual_seed(seed)
    main = _encode(processor, images, prompts)
    vsv = {}
    if lam > 0:
        pos, neg = _last_outputs(model, main), _last_outputs(model, _encode(processor, None, prompts, image=False))
        vsv = {i: pos[i] - neg[i] for i in pos}
    streams = [_Stream(model, main, use_cache)]
    if with_vcd:
        streams.append(_Stream(model, _vcd(main, generator), use_cache))

    def combine(step, outs):
        logits = [_sla(model, o, layers, alpha) if alpha > 0 else o.logits[:, -1].float() for o in outs]
        return _vcd_combine(*logits) if with_vcd else logits[0]

    hooks = _steering_hooks(model, vsv, lam) if lam > 0 else []
    try:
        with vlmfix.attach(model, *attached) if attached else contextlib.nullcontext():
            return _decode(streams, combine, policy, generator)
    finally:
        for h in hooks:
            h.remove()


VISTA_CASES = {
    "both": dict(lam=0.17, alpha=0.3),
    "vsv-only": dict(lam=0.5, alpha=0.0),
    "sla-only": dict(lam=0.0, alpha=0.3),
}


def _vista(lam, alpha, layers=(1, 2)):
    return vlmfix.VISTA(vsv_lambda=lam, sla_alpha=alpha, sla_layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "case,n,policy,seed",
    [
        ("both", 3, GREEDY, 0),
        ("vsv-only", 3, GREEDY, 0),
        ("sla-only", 3, GREEDY, 0),
        ("both", 3, SAMPLING, 6),
        ("both", 1, GREEDY, 0),
    ],
    ids=["both-greedy-b3", "vsv-only-greedy-b3", "sla-only-greedy-b3", "both-sample-b3", "both-greedy-b1"],
)
def test_vista_matches_naive(family, case, n, policy, seed):
    model, processor = tiny(family)
    images, prompts = make_images(n, seed=1), PROMPTS[1 : 1 + n]
    kw = VISTA_CASES[case]
    out = vlmfix.generate(
        model,
        processor,
        images,
        prompts,
        [_vista(**kw)],
        max_new_tokens=STEPS,
        return_scores=True,
        seed=seed,
        **policy,
    )
    ref_tokens, ref_scores = _vista_reference(
        model, processor, images, prompts, layers=(1, 2), policy=policy, seed=seed, **kw
    )
    _assert_same(out, ref_tokens, ref_scores)
    plain = vlmfix.generate(
        model, processor, images, prompts, [], max_new_tokens=STEPS, return_scores=True, seed=seed, **policy
    )
    assert not torch.allclose(out.scores[0][0], plain.scores[0][0]), "VISTA must change the logits"


def test_vista_default_layers_and_batch_equals_per_sample_and_cache_off():
    model, processor = tiny("llava_next")
    images, prompts = make_images(3, seed=3), PROMPTS[:3]
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    cfg = [vlmfix.VISTA()]  # SLA layers 25..30 of 32 -> {3} on 4 layers (raw last-layer output)
    batch = vlmfix.generate(model, processor, images, prompts, cfg, **kw)
    assert len(batch.stats["vista"]["vsv_norm_mean"]) == 3
    explicit = vlmfix.generate(model, processor, images, prompts, [vlmfix.VISTA(sla_layers=(3,))], **kw)
    for a, b in zip(batch.scores, explicit.scores):
        assert torch.equal(a, b)
    no_cache = vlmfix.generate(model, processor, images, prompts, cfg, use_cache=False, **kw)
    assert batch.token_ids == no_cache.token_ids
    for i in range(3):
        single = vlmfix.generate(model, processor, images[i : i + 1], prompts[i : i + 1], cfg, **kw)
        assert single.token_ids[0] == batch.token_ids[i]
        torch.testing.assert_close(single.scores[0], batch.scores[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(no_cache.scores[i], batch.scores[i], atol=1e-4, rtol=1e-4)
    vsv_only = vlmfix.generate(model, processor, images, prompts, [vlmfix.VISTA(sla_alpha=0)], **kw)
    ref_tokens, ref_scores = _vista_reference(
        model, processor, images, prompts, lam=0.17, alpha=0.0, layers=(), policy=GREEDY, seed=0
    )
    _assert_same(vsv_only, ref_tokens, ref_scores)


def test_vista_sla_runs_inside_plain_model_generate():
    """SLA lives in the model's forward (an lm_head hook), as in the released code, so a
    plain model.generate sees it while attached."""
    model, processor = tiny("llava_onevision")
    images, prompts = make_images(3, seed=2), PROMPTS[:3]
    inputs = _encode(processor, images, prompts)
    with vlmfix.attach(model, _vista(0.0, 0.3)):
        got = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    ref_tokens, ref_scores = _vista_reference(
        model, processor, images, prompts, lam=0.0, alpha=0.3, layers=(1, 2), policy=GREEDY, seed=0
    )
    L = inputs["input_ids"].shape[1]
    assert torch.equal(got.sequences[:, L:], ref_tokens)
    torch.testing.assert_close(torch.stack(got.logits, 1), ref_scores, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_vista_with_vcd_matches_naive_composition(family):
    """The steered model with SLA serves both VCD rows (as the released VISTA model would
    serve both of VCD's calls); each row is steered with its sample's vector."""
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=4), PROMPTS[1:4]
    out = vlmfix.generate(
        model,
        processor,
        images,
        prompts,
        [_vista(0.17, 0.3), vlmfix.VCD()],
        max_new_tokens=STEPS,
        return_scores=True,
    )
    ref_tokens, ref_scores = _vista_reference(
        model, processor, images, prompts, lam=0.17, alpha=0.3, layers=(1, 2), policy=GREEDY, seed=0, with_vcd=True
    )
    _assert_same(out, ref_tokens, ref_scores)


def test_vista_with_var_matches_naive_attached():
    model, processor = tiny("llava")
    images, prompts = make_images(3, seed=5), PROMPTS[1:4]
    var = vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)
    out = vlmfix.generate(
        model, processor, images, prompts, [var, _vista(0.17, 0.3)], max_new_tokens=STEPS, return_scores=True
    )
    assert out.stats["var"]["rows_redistributed"] > 0
    ref_tokens, ref_scores = _vista_reference(
        model,
        processor,
        images,
        prompts,
        lam=0.17,
        alpha=0.3,
        layers=(1, 2),
        policy=GREEDY,
        seed=0,
        use_cache=False,
        attached=[var],
    )
    _assert_same(out, ref_tokens, ref_scores)


def test_vista_probe_rows_leave_avisc_and_vcd_untouched():
    """VISTA's image-free probe rows share AvisC's probe forward and then leave the batch."""
    model, processor = tiny("llava")
    images, prompts = make_images(2), PROMPTS[:2]
    kw = dict(max_new_tokens=3, return_scores=True)
    alone = vlmfix.generate(model, processor, images, prompts, [vlmfix.AvisC(), vlmfix.VCD()], **kw)
    both = vlmfix.generate(model, processor, images, prompts, [_vista(0.17, 0.0), vlmfix.AvisC(), vlmfix.VCD()], **kw)
    assert both.stats["avisc"] == alone.stats["avisc"]
    assert len(both.token_ids) == 2 and len(both.stats["vista"]["vsv_norm_mean"]) == 2


# --------------------------------------------------------------------------- LOL reference
AMATEUR = "You are a confused object detector."
REFOCUS = "You are a careful assistant. Describe only what is truly visible in the image."


def _lol_reference(
    model,
    processor,
    images,
    prompts,
    *,
    refocus,
    layer,
    policy,
    seed,
    alpha=1.0,
    weight=1.0,
    with_vcd=False,
    use_cache=True,
):
    """Expert and amateur as separate batches; the contrast at the final and the lower layer."""
    generator = torch.Generator().manual_seed(seed)
    main = _encode(processor, images, prompts)
    expert_inputs = _encode(processor, images, prompts, system=refocus) if refocus else main
    streams = [
        _Stream(model, expert_inputs, use_cache),
        _Stream(model, _encode(processor, images, prompts, system=AMATEUR), use_cache),
    ]
    if with_vcd:
        streams += [_Stream(model, main, use_cache), _Stream(model, _vcd(main, generator), use_cache)]

    def combine(step, outs):
        expert, amateur = outs[0], outs[1]
        e_final, a_final = expert.logits[:, -1].float(), amateur.logits[:, -1].float()
        e_low, a_low = _layer_logits(model, expert, layer), _layer_logits(model, amateur, layer)
        fused = (1 + alpha) * e_final - alpha * a_final + weight * ((1 + alpha) * e_low - alpha * a_low)
        probs = e_final.softmax(-1)
        fused = fused.masked_fill(probs < 0.1 * probs.max(-1, keepdim=True).values, float("-inf"))
        if with_vcd:  # LOL first (list order, same order 300), then VCD contrasts with the noised rows
            fused = _vcd_combine(fused, outs[3].logits[:, -1].float())
        return fused

    return _decode(streams, combine, policy, generator)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "refocus,n,policy,seed",
    [(REFOCUS, 3, GREEDY, 0), ("", 3, GREEDY, 0), (REFOCUS, 3, SAMPLING, 8), (REFOCUS, 1, GREEDY, 0)],
    ids=["refocused-greedy-b3", "main-expert-greedy-b3", "refocused-sample-b3", "refocused-greedy-b1"],
)
def test_lol_matches_naive(family, refocus, n, policy, seed):
    model, processor = tiny(family)
    images, prompts = make_images(n, seed=1), PROMPTS[1 : 1 + n]
    cfg = vlmfix.LOL(refocus=refocus, lower_layer=8, alpha=2.0, fusion_weight=3.0)  # layer 8 of 32 -> 1 of 4
    out = vlmfix.generate(
        model, processor, images, prompts, [cfg], max_new_tokens=STEPS, return_scores=True, seed=seed, **policy
    )
    ref_tokens, ref_scores = _lol_reference(
        model, processor, images, prompts, refocus=refocus, layer=1, policy=policy, seed=seed, alpha=2.0, weight=3.0
    )
    _assert_same(out, ref_tokens, ref_scores)


def test_lol_default_and_batch_equals_per_sample_and_cache_off():
    model, processor = tiny("llava_next")
    images, prompts = make_images(3, seed=3), PROMPTS[:3]
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    cfg = [vlmfix.LOL()]  # lower layer 16 of 32 -> 2 of 4
    batch = vlmfix.generate(model, processor, images, prompts, cfg, **kw)
    ref_tokens, ref_scores = _lol_reference(
        model, processor, images, prompts, refocus=REFOCUS, layer=2, policy=GREEDY, seed=0
    )
    _assert_same(batch, ref_tokens, ref_scores)
    no_cache = vlmfix.generate(model, processor, images, prompts, cfg, use_cache=False, **kw)
    assert batch.token_ids == no_cache.token_ids
    for i in range(3):
        single = vlmfix.generate(model, processor, images[i : i + 1], prompts[i : i + 1], cfg, **kw)
        assert single.token_ids[0] == batch.token_ids[i]
        torch.testing.assert_close(single.scores[0], batch.scores[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(no_cache.scores[i], batch.scores[i], atol=1e-4, rtol=1e-4)


def test_lol_with_vcd_matches_naive_composition():
    model, processor = tiny("llava_onevision")
    images, prompts = make_images(3, seed=4), PROMPTS[1:4]
    cfg = [vlmfix.LOL(refocus="", lower_layer=8), vlmfix.VCD()]
    out = vlmfix.generate(model, processor, images, prompts, cfg, max_new_tokens=STEPS, return_scores=True)
    ref_tokens, ref_scores = _lol_reference(
        model, processor, images, prompts, refocus="", layer=1, policy=GREEDY, seed=0, with_vcd=True
    )
    _assert_same(out, ref_tokens, ref_scores)


def test_lol_with_var_matches_naive_attached():
    model, processor = tiny("llava")
    images, prompts = make_images(3, seed=5), PROMPTS[1:4]
    var = vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)
    out = vlmfix.generate(
        model, processor, images, prompts, [var, vlmfix.LOL(lower_layer=8)], max_new_tokens=STEPS, return_scores=True
    )
    assert out.stats["var"]["rows_redistributed"] > 0
    with vlmfix.attach(model, var):
        ref_tokens, ref_scores = _lol_reference(
            model, processor, images, prompts, refocus=REFOCUS, layer=1, policy=GREEDY, seed=0, use_cache=False
        )
    _assert_same(out, ref_tokens, ref_scores)


# --------------------------------------------------------------------------- RBD reference
RBD_NAIVE = "vlmfix_test_rbd_naive"
_BOOST: dict = {}


def _boosted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention; in the boosted layers, z + gamma |z| on the significant keys."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1).float()
    v = value.repeat_interleave(n_rep, dim=1).float()
    z = (query.float() @ k.transpose(-1, -2)) * scaling
    if module.layer_idx in _BOOST["layers"]:
        sig = _BOOST["keys"]
        cols = torch.zeros(z.shape[0], z.shape[-1], dtype=torch.bool)
        cols[:, : sig.shape[1]] = sig
        for b in range(z.shape[0]):
            z[b, :, :, cols[b]] = z[b, :, :, cols[b]] + _BOOST["gamma"] * z[b, :, :, cols[b]].abs()
    z = z + attention_mask[:, :, :, : z.shape[-1]].float()
    out = torch.softmax(z, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


class _BoostedStream(_Stream):
    """A stream whose forwards run the boosted eager attention."""

    def forward(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register(RBD_NAIVE, _boosted_attention)
        AttentionMaskInterface.register(RBD_NAIVE, eager_mask)
        before = self.model.config.text_config._attn_implementation_internal
        self.model.set_attn_implementation({"text_config": RBD_NAIVE})
        try:
            return super().forward()
        finally:
            self.model.set_attn_implementation({"text_config": before})
            self.model.config.text_config._attn_implementation_internal = before
            AttentionInterface._global_mapping.pop(RBD_NAIVE, None)
            AttentionMaskInterface._global_mapping.pop(RBD_NAIVE, None)


def _significant(model, inputs, ratio):
    """Top image tokens by the last prompt token's head-averaged attention summed over
    layers, from the stock model's own eager attention maps."""
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    before = _attn_snapshot(model)
    model.set_attn_implementation("eager")
    try:
        mask = inputs["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            out = model(**inputs, position_ids=pos, output_attentions=True)
    finally:
        model.set_attn_implementation(before[""])
    attn = sum(a[:, :, -1].float().mean(1) for a in out.attentions)  # [B, L]
    sig = torch.zeros_like(image)
    for b in range(ids.shape[0]):
        cols = image[b].nonzero()[:, 0]
        n = math.ceil(ratio * len(cols))
        order = sorted(cols.tolist(), key=lambda c: -float(attn[b, c]))
        sig[b, order[:n]] = True
    return sig


def _rbd_reference(
    model,
    processor,
    images,
    prompts,
    *,
    policy,
    seed,
    alpha=1.0,
    gamma=1.0,
    ratio=0.1,
    gamma_attn=0.5,
    layers=(2, 3),
    use_cache=True,
):
    generator = torch.Generator().manual_seed(seed)
    main = _encode(processor, images, prompts)
    textual = _vcd(main, generator)
    visual = _Stream(model, main, use_cache)  # gamma_attn = 0: the visual branch is the main input
    if gamma_attn > 0:
        _BOOST.update(keys=_significant(model, main, ratio), gamma=gamma_attn, layers=set(layers))
        visual = _BoostedStream(model, main, use_cache)
    streams = [_Stream(model, main, use_cache), _Stream(model, textual, use_cache), visual]

    def combine(step, outs):
        main_l, lt, lv = (o.logits[:, -1].float() for o in outs)
        out = main_l + alpha * (main_l - lt) + gamma * (lv - main_l)
        probs = main_l.softmax(-1)
        return out.masked_fill(probs < 0.1 * probs.max(-1, keepdim=True).values, float("-inf"))

    return _decode(streams, combine, policy, generator)


RBD_CASES = {
    "defaults": dict(),
    "strong": dict(alpha=2.0, gamma=3.0, ratio=0.3, gamma_attn=2.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "case,n,policy,seed",
    [("defaults", 3, GREEDY, 0), ("strong", 3, GREEDY, 0), ("strong", 3, SAMPLING, 9), ("strong", 1, GREEDY, 0)],
    ids=["defaults-greedy-b3", "strong-greedy-b3", "strong-sample-b3", "strong-greedy-b1"],
)
def test_rbd_matches_naive(family, case, n, policy, seed):
    model, processor = tiny(family)
    images, prompts = make_images(n, seed=1), PROMPTS[1 : 1 + n]
    kw = RBD_CASES[case]
    cfg = vlmfix.RBD(
        alpha=kw.get("alpha", 1.0),
        gamma=kw.get("gamma", 1.0),
        significant_ratio=kw.get("ratio", 0.1),
        gamma_attn=kw.get("gamma_attn", 0.5),
    )  # layers 2.. of 4 = (2, 3)
    out = vlmfix.generate(
        model, processor, images, prompts, [cfg], max_new_tokens=STEPS, return_scores=True, seed=seed, **policy
    )
    ref_tokens, ref_scores = _rbd_reference(model, processor, images, prompts, policy=policy, seed=seed, **kw)
    _assert_same(out, ref_tokens, ref_scores)
    assert all(c >= 1 for c in out.stats["rbd"]["significant_tokens"])


def test_rbd_batch_equals_per_sample_and_cache_off():
    model, processor = tiny("llava_onevision")
    images, prompts = make_images(3, seed=3), PROMPTS[:3]
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    cfg = [vlmfix.RBD(gamma_attn=2.0, significant_ratio=0.3)]
    batch = vlmfix.generate(model, processor, images, prompts, cfg, **kw)
    no_cache = vlmfix.generate(model, processor, images, prompts, cfg, use_cache=False, **kw)
    assert batch.token_ids == no_cache.token_ids
    for a, b in zip(batch.scores, no_cache.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # per-sample runs draw other noise for samples > 0: compare without the textual branch
    cfg = [vlmfix.RBD(alpha=0.0, gamma_attn=2.0, significant_ratio=0.3)]
    batch = vlmfix.generate(model, processor, images, prompts, cfg, **kw)
    for i in range(3):
        single = vlmfix.generate(model, processor, images[i : i + 1], prompts[i : i + 1], cfg, **kw)
        assert single.token_ids[0] == batch.token_ids[i]
        torch.testing.assert_close(single.scores[0], batch.scores[i], atol=1e-4, rtol=1e-4)


def test_rbd_with_var_matches_naive_attached():
    """VAR applies to every row (all three streams of the reference); RBD's boost follows
    it in the visual rows (RBD edits scores before the softmax, VAR the probabilities)."""
    model, processor = tiny("llava")
    images, prompts = make_images(3, seed=5), PROMPTS[1:4]
    var = vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)
    out = vlmfix.generate(
        model,
        processor,
        images,
        prompts,
        [var, vlmfix.RBD(gamma_attn=0.0)],
        max_new_tokens=STEPS,
        return_scores=True,
    )
    assert out.stats["var"]["rows_redistributed"] > 0
    with vlmfix.attach(model, var):
        ref_tokens, ref_scores = _rbd_reference(
            model, processor, images, prompts, policy=GREEDY, seed=0, gamma_attn=0.0, use_cache=False
        )
    _assert_same(out, ref_tokens, ref_scores)


# --------------------------------------------------------------------------- shared invariants
def _hooks(model):
    return {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), len(getattr(m, "_forward_hooks_with_kwargs", {})))
        for name, m in model.named_modules()
    }


LAYER_METHODS = {
    "deco": lambda: vlmfix.DeCo(layers=(1, 2)),
    "vista": lambda: vlmfix.VISTA(sla_layers=(1, 2)),
    "vista-sla-only": lambda: vlmfix.VISTA(vsv_lambda=0),
    "lol": lambda: vlmfix.LOL(),
    "rbd": lambda: vlmfix.RBD(),
}


@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_attach_remove_leaves_no_trace(method):
    model, processor = tiny("llava_next")
    images, prompts = make_images(2), PROMPTS[:2]
    plain = vlmfix.generate(model, processor, images, prompts, [], max_new_tokens=3, return_scores=True)
    # after a first forward: transformers installs its own output-recording hooks lazily
    hooks, attn = _hooks(model), _attn_snapshot(model)
    vlmfix.generate(model, processor, images, prompts, [LAYER_METHODS[method]()], max_new_tokens=3)
    after = vlmfix.generate(model, processor, images, prompts, [], max_new_tokens=3, return_scores=True)
    assert _hooks(model) == hooks and _attn_snapshot(model) == attn and active_handle(model) is None
    assert plain.token_ids == after.token_ids
    for a, b in zip(plain.scores, after.scores):
        assert torch.equal(a, b)


def test_all_together_with_var_and_vcd_run_one_forward_per_step():
    """Every new method attached at once, with VAR and VCD: one probe forward (VISTA's
    image-free rows and RBD's measurement share it), then one forward per step."""
    from dataclasses import dataclass
    from typing import ClassVar

    from vlmfix.methods.base import Method, MethodConfig

    seen = []

    @dataclass(frozen=True)
    class _Spy(MethodConfig):
        name: ClassVar[str] = "_layer_spy"

        def build(self):
            class _M(Method):
                def on_forward(self, handle, kwargs):
                    seen.append((handle.controller.rows.probing, kwargs["input_ids"].shape[0]))

            return _M(self)

    model, processor = tiny("llava_next")
    cfg = [
        _Spy(),
        vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0),
        vlmfix.VISTA(),
        vlmfix.LOL(),
        vlmfix.RBD(),
        vlmfix.VCD(),
        vlmfix.DeCo(),
    ]
    out = vlmfix.generate(model, processor, make_images(2), PROMPTS[:2], cfg, max_new_tokens=4, return_scores=True)
    assert len(out.token_ids) == 2 and all(torch.isfinite(s).any(-1).all() for s in out.scores)
    probe, *steps = seen
    assert probe == (True, 2 * 2)  # main rows + VISTA's image-free rows
    # main + LOL (amateur, refocused) + RBD (textual, visual) + VCD = 6 rows per sample
    assert len(steps) == max(len(t) for t in out.token_ids) and all(s == (False, 2 * 6) for s in steps)
    assert set(out.stats) == {"_layer_spy", "var", "vista", "lol", "rbd", "vcd", "deco"}


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="top_p=0"):
        vlmfix.DeCo(top_p=0)
    with pytest.raises(ConfigError, match="end_layer"):
        vlmfix.DeCo(start_layer=5, end_layer=5)
    with pytest.raises(ConfigError, match="sla_alpha=1.5"):
        vlmfix.VISTA(sla_alpha=1.5)
    with pytest.raises(ConfigError, match="amateur"):
        vlmfix.LOL(amateur=" ")
    with pytest.raises(ConfigError, match="fusion_weight"):
        vlmfix.LOL(fusion_weight=-1)
    with pytest.raises(ConfigError, match="significant_ratio"):
        vlmfix.RBD(significant_ratio=0)
    with pytest.raises(ConfigError, match="does nothing"):
        vlmfix.VISTA(vsv_lambda=0, sla_alpha=0)
    model, processor = tiny("llava")
    with pytest.raises(ConfigError, match="sla_layers"):
        vlmfix.attach(model, vlmfix.VISTA(sla_layers=(9,)))
    with pytest.raises(ConfigError, match="outside this model's 4 decoder layers"):
        vlmfix.attach(model, vlmfix.DeCo(layers=(7,)))
    assert active_handle(model) is None
