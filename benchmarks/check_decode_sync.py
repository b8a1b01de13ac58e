"""On a GPU: count host syncs during decode steps with CUDA's own sync detector.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call warn. This
script turns it on for decode forwards only (the cache already holds the prompt) of
``vlmfix.generate`` and of stock ``model.generate`` under ``vlmfix.attach``, for each
attention method on a tiny random LLaVA, and prints where each sync came from. The CPU
test ``tests/integration/test_no_host_sync.py`` checks vlmfix's own code the same way by
monkeypatching; this is the same check against the real device.

Usage::

    python benchmarks/check_decode_sync.py
"""

from __future__ import annotations

import collections
import traceback
import warnings

import torch

import vlmfix
from vlmfix import _compat
from vlmfix.generation import prepare_inputs
from vlmfix.testing import build_tiny

METHODS = {
    "plain": [],
    "pai": [vlmfix.PAI()],
    "var": [vlmfix.VAR(tau=2.0, start_layer=1, end_layer=0)],
    "vhr": [vlmfix.VHR()],
    "paint": [vlmfix.PAINT()],
}


def main():
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    from PIL import Image

    model, processor = build_tiny("llava", dtype=torch.float16)
    model = model.cuda()
    images = [Image.new("RGB", (40 + 10 * i, 50), (30 * i, 90, 200)) for i in range(3)]
    prompts = ["describe the image .", "is there a dog ?", "what"]
    inputs = prepare_inputs(processor, images, prompts, device="cuda", dtype=torch.float16)
    where: collections.Counter = collections.Counter()

    def pre(module, args, kwargs):
        decode = _compat.cache_length(_compat.cache_from_kwargs(kwargs)) > 0
        torch.cuda.set_sync_debug_mode("warn" if decode else "default")

    def post(module, args, kwargs, output):
        torch.cuda.set_sync_debug_mode("default")

    hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/vlmfix/" in f.filename]
            origin = f"{frames[-1].filename.split('/vlmfix/')[-1]}:{frames[-1].lineno}" if frames else filename
            where[origin] += 1

    try:
        for name, cfgs in METHODS.items():
            where.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                vlmfix.generate(model, processor, images, prompts, methods=cfgs, max_new_tokens=8)
                with vlmfix.attach(model, *cfgs), torch.no_grad():
                    model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            ours = {k: v for k, v in where.items() if not k.startswith("/")}
            print(f"{name}: syncs in decode steps from vlmfix code: {sum(ours.values())} {dict(ours)}; "
                  f"elsewhere (transformers/torch): {sum(where.values()) - sum(ours.values())}")
    finally:
        for h in hooks:
            h.remove()


if __name__ == "__main__":
    main()
