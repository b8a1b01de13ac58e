"""Token pruning (FastV, PyramidDrop, visual-token exit, random pruning) against naive references.

The reference is written from the papers' maths, not from vlmfix: an explicit eager
attention registered with transformers under its own name that, at the ranking layer,
takes the softmax row of the last prompt token over the keys still alive, averages it
over heads, keeps each sample's top tokens with plain Python sorting, and from the
pruning layer on hides the dropped keys (probability exactly 0). Dropped query rows are
still computed there but never read: a kept row's hidden state depends on dropped rows
only through attention, so this equals dropping them. No KV cache: stock ``generate``
recomputes the whole sequence every step, and the ranking of the first forward is kept.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import FAMILIES, PROMPTS, make_images, tiny
from test_contrastive import STEPS as CONTRAST_STEPS
from test_contrastive import _encode, _naive, _Stream, _template, _vcd_combine, _vcd_noise
from test_methods_attention import Ref, install_sink_hooks, naive_pai, naive_var
from test_no_host_sync import SyncCounter

import vlmfix
from vlmfix.errors import ConfigError
from vlmfix.generation import prepare_inputs

NAIVE = "vlmfix_test_naive_prune"
STEPS = 4
GREEDY = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=0)


# --------------------------------------------------------------------------- naive reference
class Naive:
    """What the naive attention knows: the prompt, the stages and what each keeps.

    ``stages``: ``[(layer, keep_share, rank_layer or None)]``; ``scores``: for stages
    without a rank layer, a function ``(b, prompt_index) -> score``."""

    def __init__(self, model, inputs, stages, newlines_keep=False, scores=None, edits=None):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        self.L = ids.shape[1]
        self.B = ids.shape[0]
        self.image = (ids == model.config.image_token_id).tolist()
        self.pad = (mask == 0).tolist()
        self.newline = [[False] * self.L for _ in range(self.B)]
        if newlines_keep:
            self.newline = newline_flags(model, inputs)
        self.stages = sorted(stages)
        self.scores = scores
        self.edits = edits  # (ref, pre, post) of test_methods_attention
        self.alive: dict[int, list[set[int]]] = {}  # stage -> per sample alive prompt indices
        self.n_image = [
            sum(1 for j in range(self.L) if self.image[b][j] and not self.newline[b][j]) for b in range(self.B)
        ]

    def ranked(self, b, j):
        return self.image[b][j] and not self.newline[b][j]

    def alive_at(self, layer):
        """Per sample, the prompt indices a layer still holds (None: all)."""
        out = None
        for i, (first, _, _) in enumerate(self.stages):
            if layer >= first and i in self.alive:
                out = self.alive[i]
        return out

    def decide(self, i, b_scores):
        """Stage ``i`` keeps, per sample, the top ``round(keep * n)`` of its alive ranked
        tokens by ``b_scores[b][j]`` (ties: earlier index first)."""
        _, keep, _ = self.stages[i]
        before = self.alive.get(i - 1) if i > 0 else None
        alive = []
        for b in range(self.B):
            prev = before[b] if before is not None else {j for j in range(self.L) if not self.pad[b][j]}
            cands = [j for j in sorted(prev) if self.ranked(b, j)]
            n_keep = int(round(keep * self.n_image[b]))
            top = sorted(cands, key=lambda j: (-b_scores[b][j], j))[:n_keep]
            alive.append({j for j in prev if not self.ranked(b, j)} | set(top))
        self.alive[i] = alive


_STATE: list[Naive | None] = [None]


def naive_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    st = _STATE[0]
    layer = module.layer_idx
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1).float()
    v = value.repeat_interleave(n_rep, dim=1).float()
    q = query.float()
    Tq, Tk = q.shape[2], k.shape[2]
    ctx = {"q": q, "k": k, "v": v, "scaling": scaling, "qpos": list(range(Tk - Tq, Tk)), "Tk": Tk}
    z = (q @ k.transpose(-1, -2)) * scaling
    ref = st.edits[0] if st.edits else None
    unedited = z
    for f in st.edits[1] if st.edits else ():
        z = f(ref, layer, z, ctx)
    z = z + attention_mask[:, :, :, :Tk].float()
    unedited = unedited + attention_mask[:, :, :, :Tk].float()

    def hide(t, alive):
        if alive is None:
            return t
        t = t.clone()
        for b in range(st.B):
            dead = [j for j in range(st.L) if j not in alive[b]]
            t[b, :, :, dead] = float("-inf")
        return t

    for i, (_, _, rank_layer) in enumerate(st.stages):
        if rank_layer == layer and i not in st.alive and Tq == Tk:
            row = torch.softmax(hide(unedited, st.alive_at(layer))[:, :, st.L - 1], dim=-1).mean(1)
            st.decide(i, row.tolist())
    z = hide(z, st.alive_at(layer))
    probs = torch.softmax(z, dim=-1)
    for f in st.edits[2] if st.edits else ():
        probs = f(ref, layer, probs, ctx)
    out = probs @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


class _ScoreStages:
    """Stages without attention ranking decide at the model's first forward."""

    def __init__(self, model, st):
        self.st = st
        self.hook = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        for i, (_, _, rank_layer) in enumerate(self.st.stages):
            if rank_layer is None and i not in self.st.alive:
                self.st.decide(i, [[self.st.scores(b, j) for j in range(self.st.L)] for b in range(self.st.B)])


@contextmanager
def naive_mode(model, st):
    from transformers.masking_utils import eager_mask

    from vlmfix import _compat

    _compat.register_attention(NAIVE, naive_attention, eager_mask)
    before = _compat.get_attn_impl(model.config.text_config)
    model.set_attn_implementation({"text_config": NAIVE})
    _STATE[0] = st
    spy = _ScoreStages(model, st)
    try:
        yield st
    finally:
        spy.hook.remove()
        _STATE[0] = None
        model.set_attn_implementation({"text_config": before})
        _compat.set_attn_impl(model.config.text_config, before)
        _compat.unregister_attention(NAIVE)


def naive_generate(model, inputs, st):
    with naive_mode(model, st), torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=STEPS,
            do_sample=False,
            use_cache=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, st.L :], torch.stack(out.logits, dim=1)


def newline_flags(model, inputs):
    """Per sample, which prompt indices hold the learned ``image_newline`` vector."""
    with torch.no_grad():
        captured = {}

        def grab(module, args, kwargs):
            captured["e"] = kwargs["inputs_embeds"]

        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    nl = model.model.image_newline.to(captured["e"].dtype)
    return (captured["e"] == nl).all(-1).tolist()


def random_table(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(10_000, generator=g)


# --------------------------------------------------------------------------- cases
def _batch(family, n):
    model, processor = tiny(family)
    images, prompts = make_images(n), PROMPTS[:n]
    return model, processor, images, prompts, prepare_inputs(processor, images, prompts)


def _positions(inputs):
    mask = inputs["attention_mask"]
    return ((mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)).tolist()


def _case(name, model, inputs):
    """(vlmfix configs, naive state) of one named case (the tiny LMs have 4 layers)."""
    if name == "fastv":
        return [vlmfix.FastV()], Naive(model, inputs, [(2, 0.5, 1)])
    if name == "fastv_k1_r75":
        return [vlmfix.FastV(k=1, ratio=0.75)], Naive(model, inputs, [(1, 0.25, 0)])
    if name == "fastv_keep_newlines":
        cfg = vlmfix.FastV(newlines="keep")
        return [cfg], Naive(model, inputs, [(2, 0.5, 1)], newlines_keep=True)
    if name == "pdrop":
        cfg = vlmfix.PyramidDrop(layers=(1, 2, 3), reference_depth=4)
        return [cfg], Naive(model, inputs, [(1, 0.5, 0), (2, 0.25, 1), (3, 0.125, 2)])
    if name == "pdrop_default":  # [8, 16, 24] of 32 -> [1, 2, 3] of 4
        return [vlmfix.PyramidDrop()], Naive(model, inputs, [(1, 0.5, 0), (2, 0.25, 1), (3, 0.125, 2)])
    if name == "exit":
        return [vlmfix.TokenExit()], Naive(model, inputs, [(2, 0.0, None)], scores=lambda b, j: 0.0)
    if name in ("random", "random_pre_lm"):
        layer = 0 if name == "random_pre_lm" else 2
        table, pos = random_table(3), _positions(inputs)
        cfg = vlmfix.RandomPrune(layer=layer, ratio=0.6, seed=3)
        return [cfg], Naive(model, inputs, [(layer, 0.4, None)], scores=lambda b, j: float(table[pos[b][j]]))
    raise ValueError(name)  # pragma: no cover


# Batch 3 with left padding; FastV and PyramidDrop on every family, the rest on LLaVA-1.5 and
# NeXT (any-res), newline handling on the any-res families, batch 1 once (CI has 2 cores).
GRID = [(f, c, 3) for f in FAMILIES for c in ("fastv", "pdrop")]
GRID += [(f, c, 3) for f in ("llava", "llava_next") for c in ("fastv_k1_r75", "exit", "random", "random_pre_lm")]
GRID += [(f, "fastv_keep_newlines", 3) for f in ("llava_next", "llava_onevision")]
GRID += [("llava", "pdrop_default", 3), ("llava", "fastv", 1)]


def _compare(out, ref_tokens, ref_logits, atol=1e-4):
    for i, ids in enumerate(out.token_ids):
        assert ids == ref_tokens[i, : len(ids)].tolist()
        torch.testing.assert_close(out.scores[i], ref_logits[i, : len(ids)].float(), atol=atol, rtol=atol)


_STOCK: dict = {}


def _stock(model, processor, images, prompts):
    key = (id(model), tuple(prompts))
    if key not in _STOCK:
        _STOCK[key] = vlmfix.generate(model, processor, images, prompts, max_new_tokens=STEPS, return_scores=True)
    return _STOCK[key]


@pytest.mark.parametrize("family, case, n", GRID)
def test_matches_naive(family, case, n):
    model, processor, images, prompts, inputs = _batch(family, n)
    cfgs, st = _case(case, model, inputs)
    ref_tokens, ref_logits = naive_generate(model, inputs, st)
    out = vlmfix.generate(model, processor, images, prompts, methods=cfgs, max_new_tokens=STEPS, return_scores=True)
    _compare(out, ref_tokens, ref_logits)
    stock = _stock(model, processor, images, prompts)
    changed = [not torch.allclose(a[:1], b[:1], atol=1e-5) for a, b in zip(out.scores, stock.scores)]
    assert any(changed), "pruning did nothing"
    # telemetry: the image tokens each layer holds are the naive's
    stats = out.stats[cfgs[0].name]
    for i, (first, _, _) in enumerate(st.stages):
        kept = sum(1 for b in range(n) for j in st.alive[i][b] if st.image[b][j])
        assert stats["image_tokens_kept_per_layer"][str(first)] == kept
    assert 0 < stats["prefill_flops_saved_fraction"] < 1


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_generate_with_cache_matches_naive(family):
    """Stock ``model.generate`` (KV cache on, its own position ids and masks) under attach."""
    model, processor, images, prompts, inputs = _batch(family, 3)
    cfgs, st = _case("pdrop", model, inputs)
    ref_tokens, ref_logits = naive_generate(model, inputs, st)
    with vlmfix.attach(model, *cfgs), torch.no_grad():
        hf = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert torch.equal(hf.sequences[:, st.L :], ref_tokens)
    torch.testing.assert_close(torch.stack(hf.logits, 1), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: vlmfix.FastV(ratio=0.0),
        lambda: vlmfix.PyramidDrop(keep=(1.0, 1.0, 1.0)),
        lambda: vlmfix.RandomPrune(ratio=0.0, layer=0),
    ],
)
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_nothing_dropped_equals_unpruned_exactly(family, make):
    model, processor, images, prompts, _ = _batch(family, 3)
    out = vlmfix.generate(model, processor, images, prompts, methods=[make()], max_new_tokens=STEPS, return_scores=True)
    stock = _stock(model, processor, images, prompts)
    assert out.token_ids == stock.token_ids
    assert all(torch.equal(a, b) for a, b in zip(out.scores, stock.scores))


METHODS = {
    "fastv": lambda: [vlmfix.FastV()],
    "fastv_repack": lambda: [vlmfix.FastV(repack_positions=True)],
    "pdrop": lambda: [vlmfix.PyramidDrop()],
    "exit": lambda: [vlmfix.TokenExit(layer=1)],
    "random_pre_lm": lambda: [vlmfix.RandomPrune(layer=0, ratio=0.7)],
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_cache_on_equals_cache_off_and_batch_equals_per_sample(family, name):
    model, processor, images, prompts, _ = _batch(family, 3)
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    on = vlmfix.generate(model, processor, images, prompts, methods=METHODS[name](), **kw)
    off = vlmfix.generate(model, processor, images, prompts, methods=METHODS[name](), use_cache=False, **kw)
    assert on.token_ids == off.token_ids
    for a, b in zip(on.scores, off.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for i in range(3):
        one = vlmfix.generate(model, processor, images[i : i + 1], prompts[i : i + 1], methods=METHODS[name](), **kw)
        assert one.token_ids[0] == on.token_ids[i]
        torch.testing.assert_close(one.scores[0], on.scores[i], atol=1e-5, rtol=1e-5)


def test_repacked_positions_change_rope_only_after_the_pruning_layer():
    model, processor, images, prompts, _ = _batch("llava", 3)
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    kept = vlmfix.generate(model, processor, images, prompts, methods=[vlmfix.FastV()], **kw)
    packed = vlmfix.generate(model, processor, images, prompts, methods=[vlmfix.FastV(repack_positions=True)], **kw)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(kept.scores, packed.scores))
    # nothing dropped: re-packing renumbers nothing
    a = vlmfix.generate(model, processor, images, prompts, methods=[vlmfix.FastV(ratio=0.0)], **kw)
    b = vlmfix.generate(
        model, processor, images, prompts, methods=[vlmfix.FastV(ratio=0.0, repack_positions=True)], **kw
    )
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- compositions
SINK_TAU = 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_plus_var_and_pai_match_naive(family):
    """Attention methods see only the kept keys: VAR's masses and PAI's rows in pruned
    layers are over the kept keys, as in a naive pass that hides the dropped ones."""
    model, processor, images, prompts, inputs = _batch(family, 3)
    ref = Ref(model, inputs)
    hooks = install_sink_hooks(model, ref, SINK_TAU, (), {1, 2, 3})
    st = Naive(
        model, inputs, [(2, 0.5, 1)], edits=(ref, [naive_pai(0.5, {2, 3})], [naive_var(0.6, 0.5, 0.2, {1, 2, 3})])
    )
    try:
        ref_tokens, ref_logits = naive_generate(model, inputs, st)
    finally:
        for h in hooks:
            h.remove()
    cfgs = [vlmfix.VAR(tau=SINK_TAU, start_layer=1, end_layer=0), vlmfix.PAI(alpha=0.5), vlmfix.FastV()]
    out = vlmfix.generate(model, processor, images, prompts, methods=cfgs, max_new_tokens=STEPS, return_scores=True)
    _compare(out, ref_tokens, ref_logits)
    assert out.stats["var"]["rows_redistributed"] > 0


class _PrunedStream(_Stream):
    def __init__(self, model, inputs, st):
        super().__init__(model, inputs, use_cache=False)
        self.st = st

    def logits(self):
        _STATE[0] = self.st
        return super().logits()


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("branch_ranking", ["own", "main"])
def test_pruning_plus_vcd_matches_naive_two_call_reference(family, branch_ranking):
    """The contrast (noised-image) rows rank by their own attention, or copy the main rows'
    selection (``branch_ranking="main"``)."""
    model, processor = tiny(family)
    images, prompts = make_images(3, seed=1), PROMPTS[1:4]
    generator = torch.Generator().manual_seed(0)
    main = _encode(processor, images, [_template(processor, p) for p in prompts])
    noised = dict(main, pixel_values=_vcd_noise(main["pixel_values"], generator))
    st_main = Naive(model, main, [(2, 0.5, 1)])
    st_noised = Naive(model, noised, [(2, 0.5, 1)])
    with naive_mode(model, st_main):
        if branch_ranking == "main":
            _PrunedStream(model, main, st_main).logits()  # rank the main rows first
            st_noised.alive = st_main.alive
        streams = _PrunedStream(model, main, st_main), _PrunedStream(model, noised, st_noised)
        ref_tokens, ref_scores = _naive(model, *streams, _vcd_combine, GREEDY, generator)
    cfgs = [vlmfix.FastV(branch_ranking=branch_ranking), vlmfix.VCD()]
    kw = dict(max_new_tokens=CONTRAST_STEPS, return_scores=True, seed=0)
    out = vlmfix.generate(model, processor, images, prompts, cfgs, **kw)
    for i, ids in enumerate(out.token_ids):
        assert ids == ref_tokens[i, : len(ids)].tolist()
        torch.testing.assert_close(out.scores[i], ref_scores[i, : len(ids)], atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", list(METHODS))
def test_no_host_sync_in_decode_steps(monkeypatch, name):
    model, processor = tiny("llava_next")
    images, prompts = make_images(2), PROMPTS[:2]
    inputs = prepare_inputs(processor, images, prompts)
    counter = SyncCounter(monkeypatch)
    hooks = counter.watch_decode(model)
    seen = []
    hooks.append(model.register_forward_pre_hook(lambda m, a, k: seen.append(counter.on), with_kwargs=True))
    try:
        with vlmfix.attach(model, *METHODS[name](), vlmfix.VAR(tau=SINK_TAU)), torch.no_grad():
            model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        out = vlmfix.generate(model, processor, images, prompts, methods=METHODS[name](), max_new_tokens=STEPS)
    finally:
        for h in hooks:
            h.remove()
    assert sum(seen) >= STEPS
    assert out.stats
    assert counter.calls == [], counter.calls


def test_detach_restores_the_model_bit_for_bit():
    model, processor, images, prompts, inputs = _batch("llava_next", 3)
    layers = model.model.language_model.layers
    with torch.no_grad():
        before = model(**inputs).logits
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers]
    with vlmfix.attach(model, vlmfix.PyramidDrop()), torch.no_grad():
        pruned = model(**inputs).logits
    assert pruned.shape == before.shape  # the outputs keep the input's length
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in layers] == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: vlmfix.FastV(k=0), "k"),
        (lambda: vlmfix.FastV(ratio=1.5), "ratio"),
        (lambda: vlmfix.FastV(newlines="drop"), "newlines"),
        (lambda: vlmfix.FastV(branch_ranking="both"), "branch_ranking"),
        (lambda: vlmfix.PyramidDrop(layers=(16, 8)), "layers"),
        (lambda: vlmfix.PyramidDrop(keep=(0.5, 0.6, 0.1)), "keep"),
        (lambda: vlmfix.PyramidDrop(keep=(0.5,)), "keep"),
        (lambda: vlmfix.RandomPrune(layer=-1), "layer"),
        (lambda: vlmfix.TokenExit(layer=-2), "layer"),
        (lambda: vlmfix.VisionZip(dominant=-1), "dominant"),
        (lambda: vlmfix.VisionZip(per_tokens=0), "per_tokens"),
        (lambda: vlmfix.TokenMerge(ratio=1.0), "ratio"),
        (lambda: vlmfix.TokenMerge(newlines="rank"), "newlines"),
    ],
)
def test_invalid_configs_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


@pytest.mark.parametrize("other", ["paint", "rbd"])
def test_key_indexed_methods_with_pruning_are_refused_at_attach(other):
    model, *_ = _batch("llava", 1)
    with pytest.raises(ConfigError, match=other):
        vlmfix.attach(model, vlmfix.FastV(), vlmfix.methods.get(other)())
    from vlmfix.attachment import active_handle

    assert active_handle(model) is None


def test_layer_outside_the_model_is_refused_at_attach():
    model, *_ = _batch("llava", 1)
    with pytest.raises(ConfigError, match="outside this model's 4 decoder layers"):
        vlmfix.attach(model, vlmfix.FastV(k=7))
    from vlmfix.attachment import active_handle

    assert active_handle(model) is None


@pytest.mark.parametrize("name", ["fastv", "pdrop", "token_exit", "random_prune", "visionzip", "token_merge"])
def test_yaml_presets_hold_paper_defaults(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "vlmfix" / "configs" / "methods" / f"{name}.yaml"
    (cfg,) = vlmfix.methods.from_yaml(path)
    assert cfg == vlmfix.methods.get(name)()


# --------------------------------------------------------------------------- pre-LM methods
def _lm_inputs(model, inputs):
    """The LM input embeddings of a batch (image features in place), from the stock model."""
    captured = {}

    def grab(module, args, kwargs):
        captured["e"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return captured["e"]


def _parts(model, ids_row, embeds_row):
    """Per prompt index: 'text', 'base', 'grid' or 'newline' (written from the model's config)."""
    vcfg = model.config.vision_config
    base = (vcfg.image_size // vcfg.patch_size) ** 2
    nl = getattr(model.model, "image_newline", None)
    out, seen = [], 0
    for j, t in enumerate(ids_row.tolist()):
        if t != model.config.image_token_id:
            out.append("text")
            seen = 0
            continue
        if nl is not None and bool((embeds_row[j] == nl.to(embeds_row.dtype)).all()):
            out.append("newline")
        else:
            out.append("base" if seen < base else "grid")
        seen += 1
    return out


def naive_visionzip(model, inputs, embeds, dominant, contextual, per, vit):
    """Per sample: the kept prompt indices and their (merged) embeddings."""
    out = []
    for b in range(embeds.shape[0]):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
        img = [j for j in range(len(ids)) if int(ids[j]) == model.config.image_token_id]
        n = len(img)
        d = min(n, int(round(dominant * n / per)))
        c = min(n - d, int(round(contextual * n / per)))
        if vit is not None:
            score = dict(zip(img, vit[b].tolist()))
        else:
            score = {j: float(embeds[b, j].float().norm()) for j in img}
        dom = sorted(img, key=lambda j: (-score[j], j))[:d]
        rest = [j for j in img if j not in dom]
        targets = [rest[(i * len(rest)) // c] for i in range(c)] if c else []
        members = {t: [t] for t in targets}
        for j in rest:
            if j in members or not targets:
                continue
            sims = [
                float(torch.nn.functional.cosine_similarity(embeds[b, j].float(), embeds[b, t].float(), 0))
                for t in targets
            ]
            members[targets[max(range(len(sims)), key=lambda i: (sims[i], -i))]].append(j)
        row = embeds[b].clone()
        for t, group in members.items():
            row[t] = torch.stack([embeds[b, g].float() for g in group]).mean(0).to(row.dtype)
        keep = [j for j in range(len(ids)) if mask[j] and (j not in img or j in dom or j in members)]
        out.append((keep, row))
    return out


def naive_merge(model, inputs, embeds, ratio):
    out = []
    for b in range(embeds.shape[0]):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b]
        parts = _parts(model, ids, embeds[b])
        ok = [p in ("base", "grid") for p in parts]
        n = sum(ok)
        pairs = []
        for j in range(1, len(ids)):
            if ok[j] and ok[j - 1] and parts[j] == parts[j - 1]:
                sim = float(torch.nn.functional.cosine_similarity(embeds[b, j].float(), embeds[b, j - 1].float(), 0))
                pairs.append((-sim, j))
        join = {j for _, j in sorted(pairs)[: int(round(ratio * n))]}
        row, keep, head = embeds[b].clone(), [], None
        groups = {}
        for j in range(len(ids)):
            if j not in join:
                head = j
                if mask[j]:
                    keep.append(j)
            groups.setdefault(head, []).append(j)
        for h, g in groups.items():
            row[h] = torch.stack([embeds[b, i].float() for i in g]).mean(0).to(row.dtype)
        out.append((keep, row))
    return out


def naive_lm_generate(model, inputs, selections):
    """Per sample, greedy decoding of the LM over only the kept (merged) embeddings at their
    original positions, with no cache: every step re-runs the whole reduced sequence."""
    tokens, logits = [], []
    pos_all = _positions(inputs)
    embed = model.get_input_embeddings()
    for b, (keep, row) in enumerate(selections):
        e = row[keep][None]
        pos = [pos_all[b][j] for j in keep]
        toks, lg = [], []
        with torch.no_grad():
            for _ in range(STEPS):
                h = model.model.language_model(inputs_embeds=e, position_ids=torch.tensor([pos])).last_hidden_state
                step = model.lm_head(h[:, -1]).float()[0]
                nxt = int(step.argmax())
                toks.append(nxt)
                lg.append(step)
                e = torch.cat([e, embed(torch.tensor([[nxt]]))], 1)
                pos.append(pos[-1] + 1)
        tokens.append(toks)
        logits.append(torch.stack(lg))
    return tokens, logits


def _vit_cls(model, inputs):
    """The test's own [CLS] row at the penultimate ViT layer (head mean, patches only)."""
    ref = Ref(model, inputs)
    from test_methods_attention import install_vit_hooks

    hooks = install_vit_hooks(model, ref, cls=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return ref.vit["penultimate"]


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
@pytest.mark.parametrize("method", ["visionzip", "token_merge"])
def test_pre_lm_methods_match_a_reduced_sequence_reference(family, method):
    """VisionZip (CLS tower: llava; no CLS, norm: OneVision) and adjacent merging against an
    explicit LM pass over the reduced, merged embeddings, sample by sample."""
    model, processor, images, prompts, inputs = _batch(family, 3)
    embeds = _lm_inputs(model, inputs)
    if method == "visionzip":
        cfg = vlmfix.VisionZip(dominant=6, contextual=2, per_tokens=16)
        vit = _vit_cls(model, inputs) if family == "llava" else None
        selections = naive_visionzip(model, inputs, embeds, 6, 2, 16, vit)
    else:
        cfg = vlmfix.TokenMerge(ratio=0.5)
        selections = naive_merge(model, inputs, embeds, 0.5)
    ref_tokens, ref_logits = naive_lm_generate(model, inputs, selections)
    out = vlmfix.generate(model, processor, images, prompts, methods=[cfg], max_new_tokens=STEPS, return_scores=True)
    for i, ids in enumerate(out.token_ids):
        assert ids == ref_tokens[i][: len(ids)]
        torch.testing.assert_close(out.scores[i], ref_logits[i][: len(ids)], atol=1e-4, rtol=1e-4)
    kept = sum(
        1
        for b, (keep, _) in enumerate(selections)
        for j in keep
        if int(inputs["input_ids"][b, j]) == model.config.image_token_id
    )
    assert out.stats[cfg.name]["image_tokens_kept_per_layer"]["0"] == kept < out.stats[cfg.name]["image_tokens"]


@pytest.mark.parametrize("method", ["visionzip", "token_merge"])
def test_pre_lm_methods_on_anyres_batch_equal_per_sample_and_cache_off(method):
    model, processor, images, prompts, _ = _batch("llava_next", 3)
    make = {
        "visionzip": lambda: vlmfix.VisionZip(dominant=6, contextual=2, per_tokens=16),
        "token_merge": vlmfix.TokenMerge,
    }[method]
    kw = dict(max_new_tokens=STEPS, return_scores=True)
    on = vlmfix.generate(model, processor, images, prompts, methods=[make()], **kw)
    off = vlmfix.generate(model, processor, images, prompts, methods=[make()], use_cache=False, **kw)
    for i in range(3):
        one = vlmfix.generate(model, processor, images[i : i + 1], prompts[i : i + 1], methods=[make()], **kw)
        assert on.token_ids[i] == off.token_ids[i] == one.token_ids[0]
        torch.testing.assert_close(on.scores[i], off.scores[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(on.scores[i], one.scores[0], atol=1e-5, rtol=1e-5)
