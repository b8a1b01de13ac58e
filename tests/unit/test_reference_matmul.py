"""The reference backend's fp32 products of half-precision operands (no fp32 copy of the
cache on CUDA) are as exact as the fp32 products they replace."""

from __future__ import annotations

import pytest
import torch

from vlmfix.kernels import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("split", [False, True], ids=["copy", "split"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scores_and_value_products_match_float64(device, dtype, split, monkeypatch):
    # large values tensors take the split product on CUDA: force it (or not) at this size
    monkeypatch.setattr(reference, "_SPLIT_MIN", 0 if split else 1 << 62)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 64, generator=g).to(device, dtype)
    k = torch.randn(2, 4, 577, 64, generator=g).to(device, dtype)
    v = torch.randn(2, 4, 577, 64, generator=g).to(device, dtype)
    z = reference.matmul_fp32(q, k.transpose(-1, -2), 0.125)
    assert z.dtype == torch.float32
    z64 = (q.double() * 0.125) @ k.double().transpose(-1, -2)
    torch.testing.assert_close(z.double(), z64, rtol=0, atol=2e-5)
    probs = torch.softmax(z * 4, dim=-1)  # peaked rows: tiny probabilities beside large ones
    out = reference.probs_matmul_fp32(probs, v)
    assert out.dtype == torch.float32
    out64 = probs.double() @ v.double()
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=1e-5)  # fp32 summation of 577 terms
    if device == "cpu":  # elsewhere than CUDA: exactly the fp32 formulas
        assert torch.equal(z, (q.float() * 0.125) @ k.float().transpose(-1, -2))
        assert torch.equal(out, probs @ v.float())
