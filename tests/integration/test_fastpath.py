"""The fast decode path (static cache, one captured step) gives the eager path's tokens.

Both fast paths are checked: ``decode_path="static"`` (the static step, uncaptured) and
``decode_path="graph"``, where the step is captured once and replayed, so Python ran each
decode hook once while the device ran it every step. On a CUDA machine that is a CUDA
graph; on the CPU :func:`vlmfix.testing.emulated_graphs` gives the step the same
semantics (replays repeat only recorded tensor ops; host syncs are refused). Every
registered method is compared on all three tiny families: same tokens, the same per-step
logits within fp32 noise, the same telemetry.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import PROMPTS, make_images, tiny

import vlmfix
from vlmfix.errors import ConfigError
from vlmfix.testing import emulated_graphs

CUDA = torch.cuda.is_available()
FAST = "graph"
DEVICE = "cuda" if CUDA else "cpu"
STEPS = 6


@pytest.fixture(autouse=True)
def graphs():
    """``decode_path="graph"`` on the CPU: CUDA-graph semantics by emulation."""
    with emulated_graphs():
        yield


def _model(family):
    model, processor = tiny(family)
    return model.to(DEVICE), processor


def _config(name):
    if name == "var":  # the tiny LMs have no massive activations: a low tau makes sinks exist
        return vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)
    return vlmfix.methods.get(name)()


def _pair(model, processor, methods, n=3, path=FAST, **kw):
    images, prompts = make_images(n), PROMPTS[:n]
    kw = {"max_new_tokens": STEPS, "return_scores": True, **kw}
    eager = vlmfix.generate(model, processor, images, prompts, methods=methods, decode_path="eager", **kw)
    fast = vlmfix.generate(model, processor, images, prompts, methods=methods, decode_path=path, **kw)
    return eager, fast


def _assert_same(eager, fast):
    assert fast.token_ids == eager.token_ids
    for a, b in zip(eager.scores, fast.scores):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert fast.stats == eager.stats
    assert eager.decode["path"] == "eager"


@pytest.mark.parametrize("path", ["static", "graph"])
@pytest.mark.parametrize("name", vlmfix.methods.available())
def test_every_method_gives_the_eager_tokens(family, name, path):
    model, processor = _model(family)
    eager, fast = _pair(model, processor, [_config(name)], path=path)
    assert fast.decode["path"] == path and fast.decode["fallback"] is None
    _assert_same(eager, fast)
    if path == "graph":  # every step after the first decode step was a graph replay
        assert fast.decode["replays"] == STEPS - 2 and fast.decode["capture_s"] > 0


@pytest.mark.parametrize(
    "methods",
    [
        lambda: [vlmfix.VAR(tau=2.0), vlmfix.VCD()],
        lambda: [vlmfix.PAI(), vlmfix.VAR(tau=2.0), vlmfix.VHR(), vlmfix.PAINT()],
        lambda: [vlmfix.FastV(k=1, repack_positions=True)],
        lambda: [vlmfix.M3ID(), vlmfix.PAI()],
    ],
    ids=["var+vcd", "four_attention", "fastv_repacked", "m3id+pai"],
)
def test_compositions_give_the_eager_tokens(methods):
    model, processor = _model("llava")
    _assert_same(*_pair(model, processor, methods()))


@pytest.mark.parametrize("methods", [lambda: [], lambda: [vlmfix.VCD()]], ids=["plain", "vcd"])
def test_seeded_sampling_draws_the_same_tokens(methods):
    model, processor = _model("llava")
    eager, fast = _pair(model, processor, methods(), do_sample=True, temperature=1.3, top_p=0.9, top_k=50, seed=7)
    _assert_same(eager, fast)


def test_eos_stops_like_the_eager_path():
    model, processor = _model("llava")
    images, prompts = make_images(3), PROMPTS[:3]
    base = vlmfix.generate(model, processor, images, prompts, max_new_tokens=STEPS, decode_path="eager")
    # make the token that sample 0 produces at step 2 an EOS token: sample 0 stops there
    eos = base.token_ids[0][2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        eager, fast = _pair(model, processor, [])
    finally:
        model.generation_config.eos_token_id = saved
    _assert_same(eager, fast)
    assert fast.token_ids[0][-1] == eos and len(fast.token_ids[0]) <= 3


def test_one_new_token_and_a_single_row():
    model, processor = _model("llava_next")
    eager, fast = _pair(model, processor, [vlmfix.PAI()], n=1, max_new_tokens=1)
    _assert_same(eager, fast)
    assert fast.decode["path"] == "eager" and "max_new_tokens=1" in fast.decode["fallback"]
    _assert_same(*_pair(model, processor, [vlmfix.VCD()], n=1, max_new_tokens=2))


def test_requests_the_static_step_cannot_serve_fall_back_with_a_reason(caplog):
    model, processor = _model("llava")
    images, prompts = make_images(2), PROMPTS[:2]
    with caplog.at_level(logging.WARNING, logger="vlmfix.generation"):
        out = vlmfix.generate(model, processor, images, prompts, max_new_tokens=3, decode_path=FAST, use_cache=False)
    assert out.decode["path"] == "eager" and "use_cache=False" in out.decode["fallback"]
    assert "use_cache=False" in caplog.text
    out = vlmfix.generate(model, processor, images, prompts, max_new_tokens=3, decode_path=FAST, num_beams=2)
    assert out.decode["path"] == "eager" and "beam search" in out.decode["fallback"]


def test_auto_picks_graph_on_cuda_and_eager_elsewhere():
    model, processor = _model("llava")
    out = vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], max_new_tokens=2)
    assert out.decode["path"] == ("graph" if CUDA else "eager") and out.decode["requested"] == "auto"


def test_bad_decode_paths_are_refused_before_any_work(monkeypatch):
    from vlmfix import fastpath

    monkeypatch.setattr(fastpath, "_EMULATE", False)
    model, processor = _model("llava")
    with pytest.raises(ConfigError, match="decode_path='fast'"):
        vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], decode_path="fast")
    if not CUDA:
        with pytest.raises(ConfigError, match="use decode_path='static'"):
            vlmfix.generate(model, processor, make_images(1), PROMPTS[:1], decode_path="graph")


def test_a_blocking_method_decodes_eagerly(monkeypatch):
    from vlmfix.methods.pai import PAIRuntime

    monkeypatch.setattr(PAIRuntime, "fast_path_blocker", "keeps per-step Python state", raising=False)
    model, processor = _model("llava")
    out = vlmfix.generate(
        model, processor, make_images(1), PROMPTS[:1], [vlmfix.PAI()], max_new_tokens=2, decode_path=FAST
    )
    assert out.decode["path"] == "eager" and out.decode["fallback"] == "pai: keeps per-step Python state"


def test_the_model_is_left_as_it_was():
    model, processor = _model("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config.get_text_config()._attn_implementation
    _pair(model, processor, [vlmfix.PAI(), vlmfix.VCD()])
    assert model.config.get_text_config()._attn_implementation == impl
    assert vlmfix.attachment.active_handle(model) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.skipif(not CUDA, reason="the Triton kernels run captured on CUDA only")
@pytest.mark.parametrize("name", ["baseline", "vcd", "var", "pai", "paint", "vhr", "only"])
def test_triton_kernels_inside_the_captured_step(name):
    """On the fast path decode calls take the backend's kernels (launch cost is gone).
    Captured and uncaptured, the same kernels at the same shapes give the same numbers;
    against the eager loop (other key lengths, so other split-KV reductions) the tokens."""
    from vlmfix.testing import build_tiny

    model, processor = build_tiny("llava", head_dim=64, dtype=torch.float16)
    model = model.to(DEVICE)
    images, prompts = make_images(3), PROMPTS[:3]
    kw = dict(methods=[_config(name)], max_new_tokens=STEPS, return_scores=True, backend="triton")
    runs = {
        p: vlmfix.generate(model, processor, images, prompts, decode_path=p, **kw) for p in ("eager", "static", "graph")
    }
    assert runs["graph"].decode["path"] == "graph" and runs["graph"].decode["fallback"] is None
    assert runs["graph"].token_ids == runs["static"].token_ids == runs["eager"].token_ids
    for a, b in zip(runs["static"].scores, runs["graph"].scores):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


REUSED = {
    "plain": lambda: [],
    "vcd": lambda: [vlmfix.VCD()],
    "m3id": lambda: [vlmfix.M3ID()],
    "pai": lambda: [vlmfix.PAI()],
    "var": lambda: [_config("var")],
    "paint": lambda: [vlmfix.PAINT()],
    "vhr": lambda: [vlmfix.VHR()],
    "var+vcd+pai": lambda: [_config("var"), vlmfix.VCD(), vlmfix.PAI()],
}


@pytest.mark.parametrize("family_name", ["llava", "llava_next"])
@pytest.mark.parametrize("methods", list(REUSED), ids=list(REUSED))
def test_later_calls_reuse_the_step_and_give_the_eager_tokens(family_name, methods):
    """Calls of the same row count and capacity bucket reuse the kept step (its graph):
    the prefill writes into the same cache and maps, over what earlier, longer or shorter,
    prompts left there, and the methods' per-sequence tensors (sinks, boosts, selected
    heads) are copied into the ones the graph reads. Every decode step of a reused call is
    a replay; tokens, logits and telemetry are the eager path's."""
    from vlmfix import fastpath

    model, processor = _model(family_name)
    fastpath.release(model)
    calls = [(0, PROMPTS[:3]), (1, PROMPTS[1:4]), (2, PROMPTS[2:5]), (3, [PROMPTS[4], PROMPTS[0], PROMPTS[2]])]
    reused = []
    for seed, prompts in calls:
        images = make_images(3, seed=seed)
        kw = dict(methods=REUSED[methods](), max_new_tokens=STEPS)
        eager = vlmfix.generate(model, processor, images, prompts, decode_path="eager", **kw)
        fast = vlmfix.generate(model, processor, images, prompts, decode_path=FAST, **kw)
        assert fast.token_ids == eager.token_ids, (seed, prompts)
        assert fast.stats == eager.stats, (seed, prompts)
        reused.append(fast.decode["reused"])
        if fast.decode["reused"]:
            assert fast.decode["replays"] == STEPS - 1 and fast.decode["capture_s"] == 0
    assert reused == [False, True, True, True]
    assert fastpath.release(model)


def test_a_step_whose_state_does_not_fit_is_captured_again(caplog):
    """A kept step whose host decisions differ from the new call's (say PAINT found boosted
    keys in one call and none in the next) is captured again, not replayed."""
    from vlmfix import fastpath

    model, processor = _model("llava")
    fastpath.release(model)
    images, prompts = make_images(3), PROMPTS[:3]
    kw = dict(max_new_tokens=STEPS, decode_path=FAST)
    vlmfix.generate(model, processor, images, prompts, [vlmfix.PAINT()], **kw)
    kept = fastpath._KEPT[model].states[0]
    kept.decisions = (not kept.decisions[0],) + kept.decisions[1:]
    with caplog.at_level(logging.INFO, logger="vlmfix.generation"):
        out = vlmfix.generate(model, processor, images, prompts, [vlmfix.PAINT()], **kw)
    assert "capturing the decode step again: paint: host decisions differ" in caplog.text
    eager = vlmfix.generate(
        model, processor, images, prompts, [vlmfix.PAINT()], max_new_tokens=STEPS, decode_path="eager"
    )
    assert not out.decode["reused"] and out.decode["replays"] == STEPS - 2
    assert out.token_ids == eager.token_ids and out.stats == eager.stats
    assert vlmfix.generate(model, processor, images, prompts, [vlmfix.PAINT()], **kw).decode["reused"]
    fastpath.release(model)


def test_a_method_without_graph_state_frees_the_kept_step():
    from vlmfix import fastpath

    model, processor = _model("llava")
    vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], max_new_tokens=3, decode_path=FAST)
    vlmfix.generate(model, processor, make_images(3), PROMPTS[:3], [vlmfix.AvisC()], max_new_tokens=3, decode_path=FAST)
    assert not fastpath.release(model)
