"""End to end: every attention method gives the same tokens on the triton and reference
backends (tiny models whose head dim the kernels take; Triton's interpreter on the CPU).

The interpreter is slow, so the CPU grid is small: one case per plan feature and one with
every method together on LLaVA-1.5 (MHA), the combined case on OneVision (GQA 2:1); a
batch of two with left padding, three new tokens. On a GPU the same tests run in fp16.
"""

from __future__ import annotations

import kernel_inputs  # noqa: F401  (switches on the interpreter without a GPU; first import)
import pytest
import torch
from conftest import PROMPTS, make_images

import vlmfix
from vlmfix.kernels import dispatch
from vlmfix.testing import build_tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
pytestmark = pytest.mark.skipif(not dispatch.available(DEVICE), reason=str(dispatch.unavailable_reason(DEVICE)))

CASES = {
    "pai": lambda: [vlmfix.PAI(alpha=0.5)],
    "var": lambda: [vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)],
    "paint": lambda: [vlmfix.PAINT()],
    "vhr_one_pass": lambda: [vlmfix.VHR(mode="one_pass")],
    "all": lambda: [vlmfix.PAI(), vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0), vlmfix.VHR(), vlmfix.PAINT()],
}
_MODELS: dict = {}


def _model(family):
    if family not in _MODELS:
        model, processor = build_tiny(family, head_dim=64, dtype=DTYPE)
        _MODELS[family] = (model.to(DEVICE), processor)
    return _MODELS[family]


GRID = [("llava", c) for c in CASES] + [("llava_onevision", "all")]


@pytest.mark.parametrize("family, case", GRID)
def test_triton_backend_matches_reference(family, case):
    model, processor = _model(family)
    images, prompts = make_images(2), PROMPTS[:2]
    outs = {}
    for backend in ("reference", "triton"):
        outs[backend] = vlmfix.generate(
            model, processor, images, prompts, methods=CASES[case](), max_new_tokens=3, return_scores=True,
            backend=backend,
        )
    ref, tri = outs["reference"], outs["triton"]
    assert tri.token_ids == ref.token_ids
    # fp32: the kernels accumulate in another order than the dense reference
    tol = dict(atol=2e-3, rtol=2e-3) if DTYPE == torch.float16 else dict(atol=5e-4, rtol=1e-3)
    for a, b in zip(tri.scores, ref.scores):
        torch.testing.assert_close(a, b, **tol)
    edited = [name for name, s in tri.stats.items() if "edited_forwards" in s]
    assert all(tri.stats[n]["edited_forwards"]["decode"] >= 1 for n in edited)
