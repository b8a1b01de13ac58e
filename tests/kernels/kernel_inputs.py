"""Random attention-plan inputs with a LLaVA-like key layout, for the kernel tests.

Importing this module also switches on Triton's CPU interpreter when there is no CUDA
device. ``TRITON_INTERPRET`` is read when a kernel is defined, and vlmfix defines its
kernels on first use, so setting it here (the kernel test modules import this first) is
enough; vlmfix itself never sets it. This is not a ``tests/kernels/conftest.py`` because a
second ``conftest`` module without a package would replace ``tests/conftest.py`` in
``sys.modules`` and break the other tiers' ``from conftest import ...``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vlmfix.kernels._common import IMAGE, IMAGE_SINK, PAD, TEXT, TEXT_SINK

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Per-dtype tolerances on outputs of unit-variance values: fp16 rounds P before P @ V.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def layout(t_real: int, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and positions of one sample: ``pad`` PAD keys, then a text prefix, an image
    block with a few sink keys, and a text suffix with a text sink; positions count real
    tokens only (PAD keys get position 0)."""
    labels = torch.full((pad + t_real,), TEXT, dtype=torch.int8)
    labels[:pad] = PAD
    start = pad + min(5, t_real // 4)
    end = start + (t_real * 3) // 4
    labels[start:end] = IMAGE
    n_img = end - start
    if n_img:
        sinks = torch.randperm(n_img, generator=gen)[: max(1, n_img // 16)] + start
        labels[sinks] = IMAGE_SINK
    if end < pad + t_real:
        labels[end] = TEXT_SINK
    pos = torch.cat([torch.zeros(pad, dtype=torch.int64), torch.arange(t_real)])
    return labels, pos


def make_inputs(
    b: int,
    h: int,
    hkv: int,
    tq: int,
    tk: int,
    d: int,
    dtype: torch.dtype,
    *,
    pads: tuple[int, ...] | None = None,
    pre: bool = False,
    reweight: bool = False,
    head_scale: bool = False,
    seed: int = 0,
) -> tuple[tuple, dict]:
    """``(q, k, v), kwargs`` for ``plan_attention``; the queries are the last ``tq`` keys."""
    gen = torch.Generator().manual_seed(seed)
    pads = pads or (0,) * b
    lab_pos = [layout(tk - p, p, gen) for p in pads]
    labels = torch.stack([lp[0] for lp in lab_pos])
    k_pos = torch.stack([lp[1] for lp in lab_pos])
    q_pos = k_pos[:, tk - tq :].contiguous()

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q, k, v = rnd(b, h, tq, d), rnd(b, hkv, tk, d), rnd(b, hkv, tk, d)
    kw = dict(labels=labels.to(DEVICE), q_pos=q_pos.to(DEVICE), k_pos=k_pos.to(DEVICE), scale=d**-0.5)
    if pre:
        is_img = (labels == IMAGE) | (labels == IMAGE_SINK)
        coef = torch.rand(b, h, tk, generator=gen) * is_img[:, None, :]  # PAI-like: boost image keys
        kw["pre_rows"] = (torch.rand(b, tq, generator=gen) > 0.3).to(DEVICE)
        kw["pre_coef"] = coef.to(DEVICE)
    if reweight:
        kw["reweight"] = ((torch.rand(b, tq, generator=gen) > 0.2).to(DEVICE), 0.3, 0.5, 0.05)
    if head_scale:
        kw["head_scale"] = (torch.rand(b, h, generator=gen) + 0.5).to(DEVICE)
    return (q, k, v), kw
