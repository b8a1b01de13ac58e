"""transformers compatibility: the cache keyword, the phase, no warnings, edits on every
decode step of stock ``generate``. These tests run on the oldest (5.17) and the newest
supported transformers release in CI."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import PROMPTS, make_images, tiny
from packaging.version import Version

import vlmfix
from vlmfix import _compat
from vlmfix.errors import LayoutMismatchError
from vlmfix.generation import prepare_inputs

SINK_TAU = 2.0  # the tiny LMs have no massive activations; a low tau makes sinks exist
STEPS = 4

ATTENTION_METHODS = {
    "pai": lambda: vlmfix.PAI(),
    "var": lambda: vlmfix.VAR(tau=SINK_TAU, start_layer=1, end_layer=0),
    "vhr_forward": lambda: vlmfix.VHR(),
    "vhr_one_pass": lambda: vlmfix.VHR(mode="one_pass"),
    "paint": lambda: vlmfix.PAINT(),
}


def _inputs(family, n=2):
    model, processor = tiny(family)
    images, prompts = make_images(n), PROMPTS[:n]
    return model, processor, images, prompts, prepare_inputs(processor, images, prompts)


def test_cache_kwarg_follows_the_installed_release(family):
    model, *_ = _inputs(family)
    expected = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"
    assert _compat.cache_kwarg(model) == expected


def test_cache_is_found_under_either_name():
    marker = object()
    assert _compat.cache_from_kwargs({"cache": marker}) is marker
    assert _compat.cache_from_kwargs({"past_key_values": marker}) is marker
    assert _compat.cache_from_kwargs({"cache": None, "past_key_values": marker}) is marker
    assert _compat.cache_from_kwargs({}) is None
    assert _compat.cache_length(None) == 0


def test_vlmfix_generate_is_warning_free(family):
    model, processor, images, prompts, _ = _inputs(family)
    methods = [vlmfix.PAI(), vlmfix.VAR(tau=SINK_TAU), vlmfix.VCD()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = vlmfix.generate(model, processor, images, prompts, methods=methods, max_new_tokens=3)
    assert len(out.token_ids) == 2


def test_attach_and_stock_generate_are_warning_free(family):
    model, _, _, _, inputs = _inputs(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with vlmfix.attach(model, vlmfix.PAI(), vlmfix.VHR()), torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("name", list(ATTENTION_METHODS))
def test_every_decode_step_of_stock_generate_is_edited(family, name):
    """Under ``attach`` every decode forward of stock ``generate`` is a decode (not a new
    prefill) and the method edits it."""
    model, _, _, _, inputs = _inputs(family)
    cfg = ATTENTION_METHODS[name]()
    with vlmfix.attach(model, cfg) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        counts = dict(handle.controller.edited_forwards.get(cfg.name, {"prefill": 0, "decode": 0}))
        forwards = handle.controller.forward_index
    assert out.shape[1] == inputs["input_ids"].shape[1] + STEPS
    # one prefill forward, then STEPS - 1 decode forwards (VHR's forward mode adds its
    # image-free probe, which is a prefill of its own)
    assert counts["decode"] == STEPS - 1, counts
    assert forwards - counts["decode"] >= 1


def test_vlmfix_generate_edits_every_decode_step(family):
    model, processor, images, prompts, _ = _inputs(family)
    cfgs = [ATTENTION_METHODS[k]() for k in ("pai", "var", "vhr_forward", "paint")]
    out = vlmfix.generate(model, processor, images, prompts, methods=cfgs, max_new_tokens=STEPS)
    steps = max(len(ids) for ids in out.token_ids)
    for cfg in cfgs:
        assert out.stats[cfg.name]["edited_forwards"]["decode"] == steps - 1, (cfg.name, out.stats[cfg.name])
        assert out.stats[cfg.name]["edited_forwards"]["prefill"] >= 1


def test_a_layout_that_does_not_match_the_keys_raises(family):
    model, _, _, _, inputs = _inputs(family)
    with vlmfix.attach(model, vlmfix.PAI()) as handle:
        ctrl = handle.controller

        def corrupt(module, args, kwargs):
            ctrl.layout = ctrl.layout.extend(1)  # one position too many

        lm = handle.adapter.get(model, "language_model")
        hook = lm.register_forward_pre_hook(corrupt, with_kwargs=True)
        try:
            with torch.no_grad(), pytest.raises(LayoutMismatchError, match="key positions"):
                model(**inputs)
        finally:
            hook.remove()
