"""Speed of token pruning on full-size (random) LLaVA models, against unpruned decoding.

Two scenarios, each measured in one process on one GPU (fp16, sdpa, cuDNN sdpa off):

* **FastV** (K=2, R=50%) on a random LLaVA-NeXT-7B with one ~2950-token any-res prompt
  (a 500px image: base grid + a 2x2 crop grid with newlines), beside plain vlmfix, stock
  ``model.generate``, random pruning at the same budget, PyramidDrop, visual-token exit, and
  **the peers' way**: the same FastV pruning with eager attention in every layer (the
  released FastV/PyramidDrop code needs the attention weights of the ranking layer, which
  transformers only returns from eager attention, so they run eager throughout);
* **pre-LM selection** to 64 tokens (VisionZip-style, 54 dominant + 10 contextual) on a
  random LLaVA-1.5-7B, beside plain vlmfix, random pre-LM pruning to the same 64 tokens,
  and adjacent merging.

The vlmfix rows use ``--backend`` (default ``auto``: Triton on CUDA); the peers' rows run
the reference backend with its plain attention made eager. Run ``--backend reference`` too
to compare like with like. For each row: prefill time (``vlmfix.generate`` with one new token), decode ms per step
(``(total - prefill) / (new_tokens - 1)`` with EOS stopping off), peak memory, and the
prefill speed-up over plain vlmfix of the same scenario. Prints a Markdown table.

Usage::

    python benchmarks/bench_pruning.py                 # CUDA, about 3-4 minutes
    python benchmarks/bench_pruning.py --tiny          # CPU dry run on the tiny models
"""

from __future__ import annotations

import argparse
import gc
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules, script use only

import bench_contrastive as bc  # noqa: E402
from bench_methods import build_llava_next_7b  # noqa: E402

import vlmfix  # noqa: E402
from vlmfix.generation import prepare_inputs  # noqa: E402
from vlmfix.testing import build_tiny  # noqa: E402


def eager_attention(query, key, value, mask, scaling, **kwargs):
    """Plain attention computed the eager way: the full ``[B, H, Tq, Tk]`` weights in fp32."""
    from vlmfix.kernels.reference import as_bool_mask, expand_kv

    n_rep = query.shape[1] // key.shape[1]
    k, v = expand_kv(key, n_rep), expand_kv(value, n_rep)
    if mask is None:
        mask = as_bool_mask(None, query.shape[2], key.shape[2], query.device)
    z = torch.matmul(query, k.transpose(-1, -2)).float() * scaling
    weights = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1).to(query.dtype)
    return torch.matmul(weights, v)


@contextmanager
def peers_eager():
    """Within the block vlmfix's reference backend computes plain attention eagerly, as the
    peers' released code does (benchmark-only emulation; restored on exit)."""
    from vlmfix.kernels import reference

    original = reference.attention

    def attention(query, key, value, mask, scaling, **kwargs):
        if kwargs.get("score_mods") or kwargs.get("prob_mods"):
            return original(query, key, value, mask, scaling, **kwargs)
        return eager_attention(query, key, value, mask, scaling)

    reference.attention = attention
    try:
        yield
    finally:
        reference.attention = original


def run_scenario(title, model, processor, images, prompts, rows, device, new_tokens, repeats, backend="auto"):
    eos = model.generation_config.eos_token_id
    dtype = next(model.parameters()).dtype
    stock_inputs = prepare_inputs(processor, images, prompts, device=device, dtype=dtype)
    prompt_len = int(stock_inputs["attention_mask"].sum(-1).max())
    results = []
    for label, configs, mode in rows:

        def fn(n, configs=configs, mode=mode):
            if mode == "stock":
                with torch.inference_mode():
                    return model.generate(**stock_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            model.generation_config.eos_token_id = []  # exactly n tokens per sample
            try:
                if mode == "eager":  # the reference backend, its plain attention made eager
                    with peers_eager():
                        return vlmfix.generate(
                            model, processor, images, prompts, configs(), max_new_tokens=n, backend="reference"
                        )
                return vlmfix.generate(model, processor, images, prompts, configs(), max_new_tokens=n, backend=backend)
            finally:
                model.generation_config.eos_token_id = eos

        prefill, peak_prefill = bc.measure(lambda: fn(1), device, repeats)
        total, peak = bc.measure(lambda: fn(new_tokens), device, repeats)
        kept = ""
        if mode != "stock" and configs():
            out = fn(1)
            stats = next(iter(out.stats.values()))
            per_layer = stats.get("image_tokens_kept_per_layer", {})
            last = per_layer.get(str(max(int(k) for k in per_layer))) if per_layer else None
            kept = f"{stats.get('image_tokens')} -> {last} (FLOPs -{stats.get('prefill_flops_saved_fraction', 0):.0%})"
        results.append((label, prefill, total, max(peak, peak_prefill), kept))
        print(f"# {title} / {label}: prefill {prefill * 1e3:.1f} ms, total {total:.3f} s", flush=True)
    plain = next(r[1] for r in results if r[0] == "plain vlmfix")
    lines = [f"\n**{title}**, prompt {prompt_len} tokens, batch {len(prompts)}, {new_tokens} new tokens\n"]
    lines.append(
        "| method | prefill (ms) | prefill speed-up | decode (ms/step) | peak memory (GiB) | image tokens (FLOPs saved) |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | --- |")
    for label, prefill, total, peak, kept in results:
        step = (total - prefill) / max(new_tokens - 1, 1) * 1e3
        lines.append(f"| {label} | {prefill * 1e3:.1f} | {plain / prefill:.2f}x | {step:.2f} | {peak:.2f} | {kept} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny random models")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--scenarios", nargs="+", default=["next", "llava"], choices=["next", "llava"],
        help="next: FastV & co on LLaVA-NeXT-7B; llava: pre-LM selection on LLaVA-1.5-7B",
    )  # fmt: skip
    parser.add_argument(
        "--backend", default="auto", help="vlmfix attention backend of the non-eager rows (auto, reference, triton)"
    )
    args = parser.parse_args(argv)

    if args.tiny:
        device = torch.device("cpu")
        builders = {"next": lambda: build_tiny("llava_next"), "llava": lambda: build_tiny("llava")}
        sizes = {"next": 64, "llava": 32}
        zip64 = lambda: [vlmfix.VisionZip(dominant=6, contextual=2, per_tokens=16)]  # noqa: E731
        budget = 8 / 16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available; use --tiny for a CPU dry run")
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN sdpa rebuilds a graph per decode length
        device = torch.device("cuda")
        builders = {"next": lambda: build_llava_next_7b(device), "llava": lambda: bc.build_llava_7b(device)}
        sizes = {"next": 500, "llava": 336}
        zip64 = lambda: [vlmfix.VisionZip()]  # noqa: E731
        budget = 64 / 576
    N, R = args.new_tokens, args.repeats
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tables = []

    def scenario(key, title, rows):
        """Build one model, time its rows, and free it before the next scenario."""
        model, processor = builders[key]()
        images, prompts = bc.make_batch(args.batch, sizes[key])
        tables.append(run_scenario(title, model, processor, images, prompts, rows, device, N, R, args.backend))
        del model, processor
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "next" in args.scenarios:
        rows = [
            ("stock model.generate (sdpa)", lambda: [], "stock"),
            ("plain vlmfix", lambda: [], "vlmfix"),
            ("FastV K=2 R=50%", lambda: [vlmfix.FastV()], "vlmfix"),
            ("random K=2 R=50%", lambda: [vlmfix.RandomPrune()], "vlmfix"),
            ("PyramidDrop 8/16/24", lambda: [vlmfix.PyramidDrop()], "vlmfix"),
            ("visual-token exit (half depth)", lambda: [vlmfix.TokenExit()], "vlmfix"),
            ("peers' way: FastV on eager attention", lambda: [vlmfix.FastV()], "eager"),
            ("peers' way: unpruned eager attention", lambda: [], "eager"),
        ]
        scenario("next", f"LLaVA-NeXT-7B (random), FastV, backend {args.backend}", rows)

    if "llava" in args.scenarios:
        rows = [
            ("stock model.generate (sdpa)", lambda: [], "stock"),
            ("plain vlmfix", lambda: [], "vlmfix"),
            ("VisionZip-style selection to 64", zip64, "vlmfix"),
            ("random pre-LM pruning to 64", lambda: [vlmfix.RandomPrune(layer=0, ratio=1 - budget)], "vlmfix"),
            ("adjacent merging 50%", lambda: [vlmfix.TokenMerge()], "vlmfix"),
        ]
        scenario("llava", f"LLaVA-1.5-7B (random), pre-LM, backend {args.backend}", rows)

    what = "tiny random models (CPU dry run)" if args.tiny else "random full-size models, fp16, sdpa (cuDNN sdpa off)"
    print(f"\n{what} on {device_name}; torch {torch.__version__}\n")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
