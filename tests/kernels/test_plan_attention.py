"""``plan_attention`` (Triton) against ``plan_attention_reference`` (dense fp32 torch).

How the grid was picked: on CPU every kernel runs under Triton's interpreter, which costs
about 10 ms per 64 x 64 tile (D = 64) on one core, so the tier must stay near a few thousand
tiles. Awkward lengths (1, 63, 577, 2950), GQA ratios 1, 4, 7 and all head dims appear, but
the long sequences use one or two heads and a single batch row, the feature combinations run
at 63-97 tokens, and the 2950-token prefill (about 1100 live tiles, ~15-25 s) runs once, in fp16.
Each case checks the output (per-dtype tolerance) and, with reweighting, the selected rows.
"""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, TOL, make_inputs  # first: it switches on the interpreter

pytest.importorskip("triton", reason="triton is not installed; the Triton kernel tests need it")


from vlmfix.errors import BackendUnavailableError, ConfigError  # noqa: E402
from vlmfix.kernels import dispatch  # noqa: E402
from vlmfix.kernels._common import PAD  # noqa: E402
from vlmfix.kernels.plan_attention import (  # noqa: E402
    _plan_attention,
    plan_attention,
    plan_attention_reference,
)

# bf16 only on a GPU: the interpreter computes bf16 wrongly (silently).
FP = (torch.float16, torch.float32) + ((torch.bfloat16,) if DEVICE == "cuda" else ())
FEATURES = {
    "plain": {},
    "pre": dict(pre=True),
    "reweight": dict(reweight=True),
    "head_scale": dict(head_scale=True),
    "all": dict(pre=True, reweight=True, head_scale=True),
}


def check(qkv, kw, *, path="auto", num_splits=0):
    out, sel = _plan_attention(*qkv, path=path, num_splits=num_splits, **kw)
    ref, ref_sel = plan_attention_reference(*qkv, **kw)
    assert out.shape == ref.shape and out.dtype == qkv[0].dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[qkv[0].dtype])
    if "reweight" in kw:
        assert sel.dtype == torch.bool and sel.shape == ref_sel.shape
        assert torch.equal(sel, ref_sel), f"{int((sel != ref_sel).sum())} rows selected differently"
        return out, sel
    assert sel is None
    return out, sel


# (B, H, Hkv, Tq, Tk, D): queries are the last Tq keys.
PREFILL_SHAPES = [
    (2, 4, 4, 63, 63, 64),  # ratio 1
    (1, 8, 2, 63, 63, 80),  # ratio 4
    (1, 7, 1, 63, 63, 96),  # ratio 7
    (2, 2, 2, 1, 1, 128),  # one token
    (1, 2, 1, 577, 577, 64),  # ratio 2, LLaVA-1.5's image length
    (1, 1, 1, 63, 577, 128),  # a chunk of queries at the end of a longer cache
]


@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_shapes(shape, dtype):
    qkv, kw = make_inputs(*shape, dtype)
    check(qkv, kw, path="prefill")


@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(feature, path, dtype):
    tq = 97 if path == "prefill" else 3
    qkv, kw = make_inputs(2, 8, 2, tq, 97, 64, dtype, pads=(0, 11), **FEATURES[feature], seed=1)
    out, sel = check(qkv, kw, path=path)
    if feature in ("reweight", "all"):
        assert sel.any() and not sel.all(), "the inputs should select some rows and not others"


def test_features_change_the_output():
    """Each edit must actually change the result (guards against a feature silently ignored)."""
    qkv, base_kw = make_inputs(1, 4, 1, 63, 63, 64, torch.float32, seed=2)
    base, _ = _plan_attention(*qkv, path="prefill", **base_kw)
    for feature in ("pre", "reweight", "head_scale"):
        _, kw = make_inputs(1, 4, 1, 63, 63, 64, torch.float32, seed=2, **FEATURES[feature])
        out, _ = _plan_attention(*qkv, path="prefill", **kw)
        assert (out - base).abs().max() > 1e-3, feature


@pytest.mark.parametrize("dtype", FP, ids=str)
def test_left_padding_equals_per_sample(dtype):
    """A left-padded batch gives each sample's real rows what that sample gives alone."""
    pads = (0, 7, 40)
    qkv, kw = make_inputs(3, 4, 1, 70, 70, 64, dtype, pads=pads, pre=True, reweight=True, head_scale=True, seed=3)
    out, sel = check(qkv, kw, path="prefill")
    for i, pad in enumerate(pads):
        one = {
            key: (val[i : i + 1, pad:] if key in ("labels", "k_pos", "q_pos", "pre_rows") else val)
            for key, val in kw.items()
        }
        one["pre_coef"] = kw["pre_coef"][i : i + 1, :, pad:]
        one["head_scale"] = kw["head_scale"][i : i + 1]
        rows, p, rho, min_mass = kw["reweight"]
        one["reweight"] = (rows[i : i + 1, pad:], p, rho, min_mass)
        q, k, v = (x[i : i + 1, :, pad:] for x in qkv)
        alone, sel_alone = _plan_attention(q, k, v, path="prefill", **one)
        torch.testing.assert_close(out[i : i + 1, :, pad:], alone, **TOL[dtype])
        assert torch.equal(sel[i : i + 1, :, pad:], sel_alone)


def test_rows_that_see_nothing_are_zero():
    qkv, kw = make_inputs(2, 2, 1, 5, 40, 64, torch.float32, reweight=True)
    kw["labels"][1] = PAD  # the second sample has no visible key at all
    kw["q_pos"][0, 0] = -1  # a row before every key
    for path in ("prefill", "decode"):
        out, sel = check(qkv, kw, path=path)
        assert out[1].abs().max() == 0 and out[0, :, 0].abs().max() == 0
        assert not sel[1].any()


@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_positions_not_indices(path):
    """Keys in any order (e.g. a pruned or recycled cache) give the same output: visibility
    comes from positions, and the causal tile skip must not assume sorted positions."""
    tq = 70 if path == "prefill" else 4
    qkv, kw = make_inputs(1, 4, 2, tq, 150, 64, torch.float32, pre=True, reweight=True, seed=4)
    out, sel = check(qkv, kw, path=path)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q, k, v = qkv
    shuffled = dict(kw, labels=kw["labels"][:, perm], k_pos=kw["k_pos"][:, perm], pre_coef=kw["pre_coef"][..., perm])
    out2, sel2 = check((q, k[:, :, perm], v[:, :, perm]), shuffled, path=path)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    assert torch.equal(sel2, sel)


# (B, H, Hkv, Tq, Tk, D) for the split-KV decode kernel.
DECODE_SHAPES = [
    (2, 4, 4, 1, 63, 64),
    (1, 8, 2, 1, 577, 128),
    (1, 7, 1, 3, 577, 80),
    (16, 4, 1, 1, 97, 96),  # batch 16
    (1, 4, 1, 8, 200, 64),  # the largest query length that takes the decode path
    (1, 4, 1, 1, 2950, 128),  # a long cache
]


@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_shapes(shape, dtype):
    qkv, kw = make_inputs(*shape, dtype, pre=True, reweight=True, head_scale=True, seed=5)
    check(qkv, kw, path="auto")  # Tq <= 8 picks the decode kernel


@pytest.mark.parametrize("feature", ["plain", "all"])
def test_decode_many_rows_per_kv_head(feature):
    """16 query heads per KV head x 8 rows: more rows than one decode program holds (64, or
    32 with reweighting), so the rows of one KV head are split over programs."""
    qkv, kw = make_inputs(1, 16, 1, 8, 130, 64, torch.float32, **FEATURES[feature], seed=8)
    check(qkv, kw, path="decode")


@pytest.mark.parametrize("dtype", FP, ids=str)
def test_decode_segment_pure_key_blocks(dtype):
    """Contiguous segments, as in a real prompt: key blocks holding only text, only image
    keys without a sink, or image keys with sinks, where the reweighting decode skips the
    products of the segments a block lacks."""
    from vlmfix.kernels._common import IMAGE, IMAGE_SINK, TEXT

    qkv, kw = make_inputs(2, 4, 2, 1, 700, 64, dtype, pads=(0, 37), pre=True, reweight=True, seed=9)
    labels = kw["labels"]
    for b, pad in enumerate((0, 37)):
        labels[b, pad:] = TEXT
        labels[b, pad + 10 : pad + 600] = IMAGE  # several whole blocks of image keys, no sink
        labels[b, pad + 12 : pad + 15] = IMAGE_SINK  # the sinks sit in the first image block
    check(qkv, kw, path="decode")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 100])
def test_decode_split_count_does_not_matter(num_splits):
    qkv, kw = make_inputs(2, 4, 1, 2, 300, 64, torch.float32, pads=(0, 50), pre=True, reweight=True, seed=6)
    check(qkv, kw, path="decode", num_splits=num_splits)


def test_prefill_2950_fp16():
    """LLaVA-NeXT's ~2950-token prompt, one head with the pre-softmax edit (the interpreter is
    slow; reweighting's second sweep would double the time, and is covered at 577 tokens)."""
    qkv, kw = make_inputs(1, 1, 1, 2950, 2950, 64, torch.float16, pre=True, seed=7)
    check(qkv, kw, path="prefill")


def test_public_function_and_strided_inputs():
    """The public entry point takes transformers' ``[B, T, H, D]`` tensors viewed as ``[B, H, T, D]``,
    and int32 positions."""
    qkv, kw = make_inputs(1, 4, 2, 63, 63, 64, torch.float16, head_scale=True)
    kw = dict(kw, q_pos=kw["q_pos"].int(), k_pos=kw["k_pos"].int())
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv)
    assert not q.is_contiguous()
    out, sel = plan_attention(q, k, v, **kw)
    ref, _ = plan_attention_reference(*qkv, **kw)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
    assert sel is None


def test_bad_inputs_name_the_argument():
    qkv, kw = make_inputs(1, 4, 2, 8, 8, 64, torch.float16, pre=True)
    q, k, v = qkv
    with pytest.raises(ConfigError, match="labels"):
        plan_attention(q, k, v, **dict(kw, labels=kw["labels"].long()))
    with pytest.raises(ConfigError, match="k_pos"):
        plan_attention(q, k, v, **dict(kw, k_pos=kw["k_pos"][:, :4]))
    with pytest.raises(ConfigError, match="pre_rows and pre_coef"):
        plan_attention(q, k, v, **dict(kw, pre_coef=None))
    with pytest.raises(ConfigError, match="head dim"):
        plan_attention(q[..., :32], k[..., :32], v[..., :32], **kw)
    with pytest.raises(ConfigError, match="multiple of k/v heads"):
        plan_attention(q[:, :3], k, v, **dict(kw, pre_coef=kw["pre_coef"][:, :3]))
    with pytest.raises(ConfigError, match="reweight"):
        plan_attention(q, k, v, **dict(kw, reweight=(kw["pre_rows"], 0.5, 0.5)))
    with pytest.raises(ValueError, match="v must have dtype"):
        plan_attention(q, k, v.float(), **kw)


def test_forced_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.available("cpu")
    assert "CUDA" in dispatch.unavailable_reason("cpu")
    if not torch.cuda.is_available():
        assert not dispatch.available("cuda") and "is_available() is False" in dispatch.unavailable_reason("cuda")
    qkv, kw = make_inputs(1, 2, 2, 4, 4, 64, torch.float32)
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run here"):
        plan_attention(*(x.cpu() for x in qkv), **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})


def test_custom_op_under_torch_compile():
    """The op has a fake implementation, so it traces into one graph without breaks."""
    qkv, kw = make_inputs(1, 4, 2, 3, 40, 64, torch.float32, reweight=True)
    plain = (*qkv, kw["labels"], kw["q_pos"], kw["k_pos"], kw["scale"], None, None, None, 1.0, 1.0, 0.0, None)
    for path in ("prefill", "decode"):  # without reweighting, selected is an empty [0] tensor
        torch.library.opcheck(
            torch.ops.vlmfix.plan_attention.default, (*plain, path, 0), test_utils=("test_schema", "test_faketensor")
        )
    torch.library.opcheck(
        torch.ops.vlmfix.plan_attention.default,
        (
            *qkv,
            kw["labels"],
            kw["q_pos"],
            kw["k_pos"],
            kw["scale"],
            None,
            None,
            kw["reweight"][0],
            0.3,
            0.5,
            0.05,
            None,
            "auto",
            0,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )

    def f(q, k, v):
        return plan_attention(q, k, v, **kw)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, sel = compiled(*qkv)
    ref, ref_sel = plan_attention_reference(*qkv, **kw)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert torch.equal(sel, ref_sel)
