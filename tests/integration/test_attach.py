"""attach()/remove(): stock behaviour with nothing attached, and exact restoration."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix import attention
from vlmfix.attachment import _attn_snapshot, active_handle
from vlmfix.errors import ConfigError, StateError
from vlmfix.generation import prepare_inputs


def _hooks(model):
    out = {}
    for name, mod in model.named_modules():
        out[name] = (
            len(mod._forward_pre_hooks),
            len(mod._forward_hooks),
            len(mod._backward_hooks),
            len(getattr(mod, "_forward_hooks_with_kwargs", {})),
        )
    return out


def _inputs(family, n=3):
    model, processor = tiny(family)
    return model, processor, prepare_inputs(processor, make_images(n), PROMPTS[:n])


@pytest.mark.parametrize("stock_attn", ["sdpa", "eager"])
def test_nothing_attached_matches_stock(family, stock_attn):
    model, processor, inputs = _inputs(family)
    before = _attn_snapshot(model)
    model.set_attn_implementation(stock_attn)
    try:
        ref = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        with vlmfix.attach(model):
            assert model.config.text_config._attn_implementation == "vlmfix"
            assert model.config.vision_config._attn_implementation == stock_attn
            out = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        model.set_attn_implementation(before[""])
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_vlmfix_generate_matches_stock_generate(family):
    model, processor, inputs = _inputs(family)
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], max_new_tokens=6, return_scores=True)
    L = inputs["input_ids"].shape[1]
    ref_logits = torch.stack(ref.logits, dim=1)
    for i, ids in enumerate(out.token_ids):
        assert ref.sequences[i, L : L + len(ids)].tolist() == ids
        torch.testing.assert_close(out.scores[i], ref_logits[i, : len(ids)], atol=1e-5, rtol=1e-5)


def test_remove_restores_bit_for_bit(family):
    model, processor, inputs = _inputs(family)
    with torch.no_grad():
        before_logits = model(**inputs).logits
    attn_before, hooks_before = _attn_snapshot(model), _hooks(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = vlmfix.attach(model, vlmfix.methods.get("baseline")())
    assert active_handle(model) is handle
    assert attention.is_registered()
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    handle.remove()  # idempotent
    assert _attn_snapshot(model) == attn_before
    assert _hooks(model) == hooks_before
    assert active_handle(model) is None
    assert not attention.is_registered()
    assert all(m not in attention._CONTROLLERS for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k])
    with torch.no_grad():
        after_logits = model(**inputs).logits
    assert torch.equal(before_logits, after_logits)


def test_restored_even_when_block_raises():
    model, _, _ = _inputs("llava", 1)
    before = _attn_snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vlmfix.attach(model):
            raise RuntimeError("boom")
    assert _attn_snapshot(model) == before
    assert not attention.is_registered()


def test_double_attach_is_refused():
    model, _, _ = _inputs("llava", 1)
    with vlmfix.attach(model):
        with pytest.raises(StateError, match="already attached"):
            vlmfix.attach(model)
    assert not attention.is_registered()


def test_attach_rejects_non_configs():
    model, _, _ = _inputs("llava", 1)
    with pytest.raises(ConfigError, match="method configs"):
        vlmfix.attach(model, "var")
    assert not attention.is_registered()
    assert active_handle(model) is None


def test_explicit_reference_path_equals_sdpa():
    from vlmfix.kernels import reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 9, 8, generator=g)
    v = torch.randn(2, 2, 9, 8, generator=g)
    mask = reference.as_bool_mask(None, 5, 9, "cpu").expand(2, 1, 5, 9).clone()
    mask[1, :, :, :3] = False  # left padding of sample 1
    fast = reference.attention(q, k, v, mask, 8**-0.5)
    slow = reference.attention(q, k, v, mask, 8**-0.5, explicit=True)
    # independent computation
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) * 8**-0.5
    s = s.masked_fill(~mask, float("-inf"))
    naive = torch.softmax(s, -1) @ vv
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, naive, atol=1e-5, rtol=1e-5)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    from vlmfix.errors import BackendUnavailableError

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel tests may switch the interpreter on
    model, _, _ = _inputs("llava", 1)
    with pytest.raises(BackendUnavailableError, match="Use backend='reference'"):
        vlmfix.attach(model, backend="triton")
    with pytest.raises(ConfigError, match="not one of"):
        vlmfix.attach(model, backend="cuda")
    monkeypatch.setenv("VLMFIX_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="the tensors are on the CPU"):
        vlmfix.attach(model)
    monkeypatch.setenv("VLMFIX_BACKEND", "fast")
    with pytest.raises(ConfigError, match=r"\$VLMFIX_BACKEND='fast' is not one of"):
        vlmfix.attach(model)
    assert not attention.is_registered() and active_handle(model) is None


def test_auto_backend_is_reference_on_the_cpu(monkeypatch):
    monkeypatch.delenv("VLMFIX_BACKEND", raising=False)
    model, _, _ = _inputs("llava", 1)
    with vlmfix.attach(model) as handle:
        assert handle.controller.backend == "reference"
    monkeypatch.setenv("VLMFIX_BACKEND", "reference")
    with vlmfix.attach(model) as handle:
        assert handle.controller.backend == "reference"


def test_logit_methods_warn_outside_vlmfix_generate():
    model, processor, inputs = _inputs("llava", 2)
    with vlmfix.attach(model, vlmfix.VCD()):
        with pytest.warns(UserWarning, match="only inside vlmfix.generate"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], [vlmfix.VCD()], max_new_tokens=2)
