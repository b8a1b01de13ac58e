"""Speed of contrastive decoding: VCD batch-fused vs plain decoding vs two calls per step.

Builds a randomly initialised full-size LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B,
fp16, sdpa with cuDNN sdpa disabled) from its config with ``vlmfix.bench.build_llava_7b``,
so no download is needed (compute does not depend on weight values), and generates a
fixed number of tokens (EOS stopping off, greedy) for one batch of prompts with:

* ``hf_generate``: stock ``model.generate`` (sdpa), the reference of DESIGN.md section 9;
* ``vlmfix``: plain :func:`vlmfix.generate`, no method;
* ``vlmfix + VCD (fused)``: :func:`vlmfix.generate` with VCD, the contrast rows batched
  with the main rows (one forward per step);
* ``VCD sequential (two calls)``: what the papers' code does: the stock model called once
  on the main batch and once on the noised batch per step, each with its own KV cache.

Prints a Markdown table: tokens/s (generated tokens of the main rows), ms per decode
step, prefill latency (the same call with one new token), peak GPU memory and the ratio
of the total time to plain ``vlmfix``.

Usage::

    python benchmarks/bench_contrastive.py                 # full size, CUDA
    python benchmarks/bench_contrastive.py --tiny          # CPU dry run on a tiny model
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vlmfix
from vlmfix._compat import cache_kwarg
from vlmfix.bench.models import build_llava_7b, make_batch
from vlmfix.branches import contrast
from vlmfix.generation import prepare_inputs
from vlmfix.methods.vcd import diffusion_noise
from vlmfix.testing import build_tiny


@torch.inference_mode()
def vcd_sequential(model, processor, images, prompts, new_tokens: int, seed: int = 0):
    """VCD the papers' way: two stock model calls per step, each batch with its own cache."""
    from transformers import DynamicCache

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    cfg = vlmfix.VCD()
    generator = torch.Generator(device=device).manual_seed(seed)
    main = prepare_inputs(processor, images, prompts, device=device)
    noised = dict(main)
    noised["pixel_values"] = diffusion_noise(main["pixel_values"], cfg.noise_step, generator, cfg.num_steps).to(dtype)
    main["pixel_values"] = main["pixel_values"].to(dtype)
    mask = main["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    caches = [DynamicCache(config=model.config.get_text_config()) for _ in range(2)]
    cache_kw = cache_kwarg(model)
    tokens, nxt = [], None
    for _ in range(new_tokens):
        if nxt is None:
            outs = [
                model(**inp, position_ids=pos, **{cache_kw: c}, logits_to_keep=1)
                for inp, c in zip((main, noised), caches)
            ]
        else:
            outs = [
                model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, -1:], **{cache_kw: c})
                for c in caches
            ]
        logits = contrast(outs[0].logits[:, -1].float(), outs[1].logits[:, -1].float(), cfg.alpha, cfg.beta)
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    return torch.stack(tokens, 1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_once(fn, device):
    """Seconds of one ``fn()`` call and its peak memory in GiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return time.perf_counter() - t0, peak


def measure(fn, device, repeats: int):
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up) and peak memory in GiB."""
    fn()
    times, peak = [], 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**30)
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny random LLaVA")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    if args.tiny:
        device = torch.device("cpu")
        model, processor = build_tiny("llava")
        image_size = 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available; use --tiny for a CPU dry run")
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN sdpa rebuilds a graph per decode length
        device = torch.device("cuda")
        model, processor = build_llava_7b(device)
        image_size = 336
    B, N = args.batch, args.new_tokens
    images, prompts = make_batch(B, image_size)
    stock_inputs = prepare_inputs(processor, images, prompts, device=device, dtype=next(model.parameters()).dtype)
    eos = model.generation_config.eos_token_id

    def vlmfix_run(methods, n):
        # No EOS stopping: every sample generates exactly n tokens.
        model.generation_config.eos_token_id = []
        try:
            return vlmfix.generate(model, processor, images, prompts, methods, max_new_tokens=n)
        finally:
            model.generation_config.eos_token_id = eos

    def hf_run(n):
        with torch.inference_mode():
            return model.generate(**stock_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    variants = {
        "hf_generate (stock, sdpa)": hf_run,
        "vlmfix": lambda n: vlmfix_run([], n),
        "vlmfix + VCD (fused rows)": lambda n: vlmfix_run([vlmfix.VCD()], n),
        "VCD sequential (two calls/step)": lambda n: vcd_sequential(model, processor, images, prompts, n),
    }
    rows = {}
    for name, fn in variants.items():
        prefill, _ = measure(lambda fn=fn: fn(1), device, args.repeats)
        total, peak = measure(lambda fn=fn: fn(N), device, args.repeats)
        rows[name] = (total, prefill, peak)
        print(f"# {name}: total {total:.3f}s prefill {prefill:.3f}s", flush=True)
    plain = rows["vlmfix"][0]
    prompt_len = int(stock_inputs["attention_mask"].sum(-1).max())
    what = "tiny random LLaVA (CPU dry run)" if args.tiny else "random LLaVA-1.5-7B, fp16, sdpa (cuDNN sdpa off)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{what} on {device_name}; torch {torch.__version__}, batch {B}, {N} new tokens, prompt <= {prompt_len} tokens\n"
    )
    print("| variant | tokens/s | ms/step (decode) | prefill (ms) | peak memory (GiB) | time vs vlmfix plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (total, prefill, peak) in rows.items():
        per_step = (total - prefill) / max(N - 1, 1) * 1e3
        print(
            f"| {name} | {B * N / total:.1f} | {per_step:.2f} | {prefill * 1e3:.1f} | {peak:.2f} | {total / plain:.2f}x |"
        )


if __name__ == "__main__":
    main()
