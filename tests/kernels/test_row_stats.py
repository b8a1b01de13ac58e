"""``last_row_stats`` (Triton) against ``last_row_stats_reference`` (dense fp32 torch).

The grid follows test_plan_attention's reasoning (interpreter cost per 64-key tile): GQA
ratios 1, 4, 7, all head dims, lengths 1, 63, 577 and 2950, left padding, fp16 and fp32.
"""

from __future__ import annotations

import pytest
import torch
from kernel_inputs import DEVICE, TOL, make_inputs  # first: it switches on the interpreter

pytest.importorskip("triton", reason="triton is not installed; the Triton kernel tests need it")


from vlmfix.errors import ConfigError  # noqa: E402
from vlmfix.kernels._common import IMAGE, PAD  # noqa: E402
from vlmfix.kernels.row_stats import last_row_stats, last_row_stats_reference  # noqa: E402


def inputs(b, h, hkv, tk, d, dtype, pads=None, seed=0):
    (q, k, v), kw = make_inputs(b, h, hkv, 1, tk, d, dtype, pads=pads, seed=seed)
    return (q[:, :, 0], k, v), dict(
        labels=kw["labels"], k_pos=kw["k_pos"], q_pos_row=kw["q_pos"][:, 0], scale=kw["scale"]
    )


def check(args, kw):
    probs, out = last_row_stats(*args, **kw)
    ref_probs, ref_out = last_row_stats_reference(*args, **kw)
    assert probs.dtype == torch.float32 and out.dtype == args[0].dtype
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[args[0].dtype])
    return probs, out


# (B, H, Hkv, Tk, D)
SHAPES = [
    (2, 4, 4, 63, 64),
    (1, 8, 2, 577, 128),
    (1, 7, 1, 577, 80),
    (3, 2, 2, 1, 96),
    (1, 4, 1, 2950, 128),
]


@pytest.mark.parametrize(
    "dtype", (torch.float16, torch.float32) + ((torch.bfloat16,) if DEVICE == "cuda" else ()), ids=str
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_last_row_stats_shapes(shape, dtype):
    args, kw = inputs(*shape, dtype)
    probs, _ = check(args, kw)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_padding_and_invisible_keys():
    args, kw = inputs(3, 4, 2, 120, 64, torch.float32, pads=(0, 30, 120))  # the last sample is all padding
    kw["q_pos_row"][0] = 50  # an earlier row: later keys are invisible
    probs, out = check(args, kw)
    assert probs[0, :, 51:].abs().max() == 0 and probs[1, :, :30].abs().max() == 0
    assert probs[2].abs().max() == 0 and out[2].abs().max() == 0
    kw["labels"][1, 30:] = torch.where(kw["labels"][1, 30:] == PAD, PAD, IMAGE)  # no text key: text-only output is 0
    probs, out = check(args, kw)
    assert out[1].abs().max() == 0 and probs[1].sum(-1).allclose(torch.ones(4, device=probs.device))


def test_bad_inputs_name_the_argument():
    args, kw = inputs(1, 4, 2, 8, 64, torch.float16)
    with pytest.raises(ConfigError, match="q_pos_row"):
        last_row_stats(*args, **dict(kw, q_pos_row=kw["q_pos_row"][:, None]))
    with pytest.raises(ConfigError, match="q must be a 3-d tensor"):
        last_row_stats(args[0][:, :, None], *args[1:], **kw)


def test_custom_op_under_torch_compile():
    args, kw = inputs(1, 4, 2, 40, 64, torch.float32)
    torch.library.opcheck(
        torch.ops.vlmfix.last_row_stats.default,
        (*args, kw["labels"], kw["k_pos"], kw["q_pos_row"], kw["scale"]),
        test_utils=("test_schema", "test_faketensor"),
    )
    compiled = torch.compile(lambda q, k, v: last_row_stats(q, k, v, **kw), backend="aot_eager", fullgraph=True)
    probs, out = compiled(*args)
    ref_probs, ref_out = last_row_stats_reference(*args, **kw)
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])


def test_strided_position_and_key_views():
    """Positions as vlmfix passes them: ``positions[:, -1]`` of a wider buffer (strided)."""
    args, kw = inputs(3, 4, 2, 90, 64, torch.float32, pads=(0, 20, 5))
    wide = torch.zeros(3, 130, dtype=kw["k_pos"].dtype, device=kw["k_pos"].device)
    wide[:, :90] = kw["k_pos"]
    kw = dict(kw, k_pos=wide[:, :90], q_pos_row=wide[:, 89])
    assert not kw["q_pos_row"].is_contiguous()
    check(args, kw)
