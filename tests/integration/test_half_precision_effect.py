"""In fp16 / bf16 every attention method still changes the model's output, and in the
same way as in fp32 (a method that silently did nothing in half precision would pass a
finite-logits check).

The change each method makes to the first-step logits is compared with the change it
makes in fp32 (same tiny model, same weights): cosine similarity above 0.95 in fp16 and
0.7 in bf16, whose 8-bit mantissa is ~2e-3 at these logits (~0.4), next to method
effects of 3e-3 to 0.3 on a random tiny model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_images

import vlmfix

METHODS = {
    "pai": lambda: vlmfix.PAI(alpha=3.0),
    "var": lambda: vlmfix.VAR(tau=2.0, p=0.0, start_layer=1, end_layer=0),  # a tau these tiny LMs reach
    "vhr": lambda: vlmfix.VHR(alpha=2.0, mode="one_pass"),
    "paint": lambda: vlmfix.PAINT(alpha=5.0, beta=5.0),
}
MIN_COSINE = {torch.float16: 0.95, torch.bfloat16: 0.7}


def _changes(dtype) -> dict[str, torch.Tensor]:
    from vlmfix.testing import build_tiny

    model, processor = build_tiny("llava_onevision", dtype=dtype)
    images, prompts = make_images(3), PROMPTS[:3]

    def first_logits(methods):
        out = vlmfix.generate(model, processor, images, prompts, methods=methods, max_new_tokens=1, return_scores=True)
        assert all(torch.isfinite(s).all() for s in out.scores)
        return torch.stack([s[0].float() for s in out.scores])

    stock = first_logits([])
    return {name: first_logits([make()]) - stock for name, make in METHODS.items()}


@pytest.fixture(scope="module")
def fp32_changes():
    return _changes(torch.float32)


@pytest.mark.parametrize("dtype", list(MIN_COSINE), ids=["fp16", "bf16"])
def test_methods_change_half_precision_logits_as_in_fp32(dtype, fp32_changes):
    changes = _changes(dtype)
    for name, change in changes.items():
        ref = fp32_changes[name]
        assert ref.abs().max() > 1e-3, f"{name} does not change even the fp32 logits: a useless case"
        assert change.abs().max() > 0, f"{name} left the {dtype} logits unchanged"
        cos = torch.nn.functional.cosine_similarity(change.flatten(), ref.flatten(), dim=0).item()
        assert cos > MIN_COSINE[dtype], f"{name} in {dtype}: change unlike fp32's (cosine {cos:.3f})"
