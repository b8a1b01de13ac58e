"""Decode speed of vlmfix's fast path against stock ``generate`` (dynamic and static cache).

Random full-size LLaVA-1.5-7B (``bench_contrastive.build_llava_7b``: fp16, sdpa, cuDNN sdpa
off), one left-padded batch, exactly ``--new-tokens`` greedy tokens (EOS stopping off).
Variants, all in one process: stock ``model.generate`` (DynamicCache), stock
``model.generate(cache_implementation="static")`` (transformers compiles its decode step;
its first call, the warm-up, is timed apart), ``vlmfix.generate`` on the eager path and on
the fast path, plain and with methods. Prints ms per decode step ((t(N) - t(1)) / (N - 1)),
prefill (t(1)), tokens/s, peak memory and capture time; ratios to stock static and to
vlmfix plain (fast path).

Usage::

    python benchmarks/bench_fastpath.py --batch 1 8 --new-tokens 64      # CUDA
    python benchmarks/bench_fastpath.py --tiny                           # CPU dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark module, script use only

import bench_contrastive as bc  # noqa: E402

import vlmfix  # noqa: E402
from vlmfix.generation import prepare_inputs  # noqa: E402
from vlmfix.testing import build_tiny  # noqa: E402

METHODS = {
    "var": lambda: [vlmfix.VAR()],
    "pai": lambda: [vlmfix.PAI()],
    "paint": lambda: [vlmfix.PAINT()],
    "vhr": lambda: [vlmfix.VHR()],
    "vcd": lambda: [vlmfix.VCD()],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--no-stock-static", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        device, (model, processor), size = torch.device("cpu"), build_tiny("llava"), 32
    else:
        torch.backends.cuda.enable_cudnn_sdp(False)
        device = torch.device("cuda")
        model, processor = bc.build_llava_7b(device)
        size = 336
    eos = model.generation_config.eos_token_id
    N = args.new_tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device {name}; torch {torch.__version__}; new tokens {N}", flush=True)
    for B in args.batch:
        images, prompts = bc.make_batch(B, size)
        inputs = prepare_inputs(processor, images, prompts, device=device, dtype=next(model.parameters()).dtype)

        def stock(n, inputs=inputs, **kw):
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

        def ours(methods, path, images=images, prompts=prompts):
            def run(n):
                model.generation_config.eos_token_id = []
                try:
                    out = vlmfix.generate(model, processor, images, prompts, methods(), max_new_tokens=n, decode_path=path)
                finally:
                    model.generation_config.eos_token_id = eos
                run.decode = out.decode

            return run

        variants = {"stock": stock}
        if not args.no_stock_static and device.type == "cuda":
            variants["stock_static"] = lambda n: stock(n, cache_implementation="static")
        variants["vlmfix eager"] = ours(lambda: [], "eager")
        fast = "graph" if device.type == "cuda" else "static"
        variants["vlmfix fast"] = ours(lambda: [], fast)
        for m in args.methods:
            variants[f"{m} eager"] = ours(METHODS[m], "eager")
            variants[f"{m} fast"] = ours(METHODS[m], fast)
        warm = {}
        for vname, fn in variants.items():  # warm-up (stock_static compiles here)
            t0 = time.perf_counter()
            fn(N)
            bc._sync(device)
            warm[vname] = time.perf_counter() - t0
        rows = {k: {"t1": [], "tN": [], "peak": 0.0} for k in variants}
        for _ in range(args.repeats):  # interleaved rounds
            for vname, fn in variants.items():
                t1, _ = bc.measure_once(lambda fn=fn: fn(1), device)
                tN, peak = bc.measure_once(lambda fn=fn: fn(N), device)
                r = rows[vname]
                r["t1"].append(t1)
                r["tN"].append(tN)
                r["peak"] = max(r["peak"], peak)
        print(f"\n## batch {B}, prompt <= {int(inputs['attention_mask'].sum(-1).max())} tokens\n")
        print("| variant | ms/step | prefill ms | tokens/s | peak GiB | first call s | capture s | x stock_static | x vlmfix fast |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        step = {}
        for vname, r in rows.items():
            t1, tN = statistics.median(r["t1"]), statistics.median(r["tN"])
            step[vname] = (tN - t1) / (N - 1) * 1e3
        for vname, r in rows.items():
            t1, tN = statistics.median(r["t1"]), statistics.median(r["tN"])
            dec = getattr(variants[vname], "decode", {}) or {}
            ref = step.get("stock_static")
            print(
                f"| {vname} | {step[vname]:.2f} | {t1 * 1e3:.1f} | {B * N / tN:.1f} | {r['peak']:.2f} | "
                f"{warm[vname]:.2f} | {dec.get('capture_s', '')} | "
                f"{step[vname] / ref if ref else float('nan'):.2f} | {step[vname] / step['vlmfix fast']:.2f} |",
                flush=True,
            )
            if dec.get("fallback"):
                print(f"  fallback: {dec['fallback']}")


if __name__ == "__main__":
    main()
