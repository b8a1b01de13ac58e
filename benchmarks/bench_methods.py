"""Cost of every method on a full-size (random) LLaVA-1.5-7B, against plain decoding.

Builds the model from its config (``vlmfix.bench.build_llava_7b`` or
``build_llava_next_7b``: fp16, sdpa, cuDNN sdpa off), then for one left-padded batch
generates exactly ``--new-tokens`` tokens (greedy, EOS stopping off) with ``vlmfix.generate`` and each registered method at its
paper defaults, plus stock ``model.generate`` as the reference. Variants run interleaved
in rounds (medians over ``--repeats`` rounds). Reports total time,
prefill time (the same call with one new token), ms per decode step, peak memory and the
ratio of the total time to plain ``vlmfix.generate`` measured in the same process, and
each method's telemetry summary (so a method that silently did nothing is visible).

Usage::

    python benchmarks/bench_methods.py --batch 8 --new-tokens 32      # CUDA
    python benchmarks/bench_methods.py --tiny                          # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark module, script use only

import bench_contrastive as bc  # noqa: E402

import vlmfix  # noqa: E402
from vlmfix.bench.models import build_llava_next_7b  # noqa: E402 (bench_pruning imports it from here)
from vlmfix.generation import prepare_inputs  # noqa: E402
from vlmfix.testing import build_tiny  # noqa: E402


def _summary(stats: dict) -> str:
    """A short, JSON-ish view of a method's telemetry (counts only)."""
    flat = {}
    for method, values in stats.items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{method}.{key}"] = round(value, 3) if isinstance(value, float) else value
    return json.dumps(dict(list(flat.items())[:4]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny random LLaVA")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "reference", "triton"], help="vlmfix attention backend"
    )
    parser.add_argument(
        "--family", default="llava", choices=["llava", "llava_next"], help="LLaVA-1.5-7B or LLaVA-NeXT-7B"
    )
    args = parser.parse_args(argv)

    if args.tiny:
        device = torch.device("cpu")
        model, processor = build_tiny(args.family)
        image_size = 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available; use --tiny for a CPU dry run")
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN sdpa rebuilds a graph per decode length
        device = torch.device("cuda")
        builder = bc.build_llava_7b if args.family == "llava" else build_llava_next_7b
        model, processor = builder(device)
        image_size = 336 if args.family == "llava" else 500  # 500px: a multi-crop any-res grid
    B, N = args.batch, args.new_tokens
    images, prompts = bc.make_batch(B, image_size)
    stock_inputs = prepare_inputs(processor, images, prompts, device=device, dtype=next(model.parameters()).dtype)
    eos = model.generation_config.eos_token_id
    names = args.methods or vlmfix.methods.available()
    last_stats: dict[str, dict] = {}

    def vlmfix_run(name, n):
        configs = [] if name == "baseline" else [vlmfix.methods.build_config(name)]
        model.generation_config.eos_token_id = []  # every sample generates exactly n tokens
        try:
            out = vlmfix.generate(model, processor, images, prompts, configs, max_new_tokens=n, backend=args.backend)
        finally:
            model.generation_config.eos_token_id = eos
        last_stats[name] = out.stats
        return out

    def hf_run(n):
        with torch.inference_mode():
            return model.generate(**stock_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    variants = [("hf_generate (stock, sdpa)", hf_run)] + [
        (name, lambda n, name=name: vlmfix_run(name, n)) for name in names
    ]
    # Rounds interleave the variants (one run of each per round, medians over rounds), so
    # a drift of the machine's speed during the run hits every variant alike.
    for _, fn in variants:  # warm-up
        fn(1)
        fn(N)
    samples = {label: {"prefill": [], "total": [], "peak": 0.0} for label, _ in variants}
    for _ in range(args.repeats):
        for label, fn in variants:
            prefill, _ = bc.measure_once(lambda fn=fn: fn(1), device)
            total, peak = bc.measure_once(lambda fn=fn: fn(N), device)
            samples[label]["prefill"].append(prefill)
            samples[label]["total"].append(total)
            samples[label]["peak"] = max(samples[label]["peak"], peak)
    rows = {}
    for label, sm in samples.items():
        rows[label] = (statistics.median(sm["total"]), statistics.median(sm["prefill"]), sm["peak"])
        print(f"# {label}: total {rows[label][0]:.3f}s prefill {rows[label][1]:.3f}s", flush=True)
    plain = rows["baseline"][0] if "baseline" in rows else rows["hf_generate (stock, sdpa)"][0]
    prompt_len = int(stock_inputs["attention_mask"].sum(-1).max())
    full = "LLaVA-1.5-7B" if args.family == "llava" else "LLaVA-NeXT-7B"
    what = f"tiny random {args.family} (CPU dry run)" if args.tiny else f"random {full}, fp16, sdpa (cuDNN sdpa off)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{what} on {device_name}; torch {torch.__version__}, batch {B}, {N} new tokens, prompt <= {prompt_len}, "
        f"vlmfix backend {args.backend}\n"
    )
    print(
        "| method | total (s) | ms/step (decode) | prefill (ms) | peak memory (GiB) | time vs plain vlmfix | telemetry |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, (total, prefill, peak) in rows.items():
        per_step = (total - prefill) / max(N - 1, 1) * 1e3
        tele = _summary(last_stats.get(label, {})) if label in last_stats else ""
        print(
            f"| {label} | {total:.3f} | {per_step:.2f} | {prefill * 1e3:.1f} | {peak:.2f} | {total / plain:.2f}x | {tele} |"
        )


if __name__ == "__main__":
    main()
