"""Speed and accuracy of ``plan_attention`` (Triton) against flash sdpa and FlexAttention.

On one CUDA GPU, fp16, LLaVA-7B attention shapes (32 query and KV heads x 128):

* correctness first: the kernel against ``plan_attention_reference`` (dense fp32) at a few
  shapes in fp16 and bf16, prefill and decode paths, every plan feature; prints the max
  abs error and fails (exit code 1) beyond the per-dtype tolerance;
* prefill, causal, batch 1, L in {640, 2944, 8192}: TFLOP/s (nominal causal FLOPs,
  ``4 * B * H * D * L^2 / 2``, the same count for every row so ratios are time ratios) of
  the plain plan, the plan with a PAI edit, with VAR reweighting, flash sdpa
  (``SDPBackend.FLASH_ATTENTION``; cuDNN sdpa switched off) and FlexAttention with a
  PAI-like ``score_mod`` (``torch.compile``d);
* decode (one query row), L in {640, 2944, 16384}, batch 1 and 16: GB/s of K/V read for
  the plain plan, VAR, and flash sdpa, next to the device's measured copy bandwidth (a
  device-to-device copy of a 1 GiB tensor, counting read + write). Decode calls are
  timed as CUDA-graph replays (which also shows they can be captured), so launch overhead
  is not what is measured.

Timing: CUDA events around each call (or graph replay), after warm-up; the median of the
repeats. Prefill rows give both: the GPU time (a graph replay of 10 calls, which the
TFLOP/s come from) and the time of one eager call, host launch cost included. Prints a Markdown table and writes everything to ``--out`` (JSON). Takes about
2-4 minutes on an H100, most of it compiling Triton and FlexAttention kernels.

Usage::

    python benchmarks/kernels/bench_plan_attention.py --out plan_attention.json
    TRITON_INTERPRET=1 python benchmarks/kernels/bench_plan_attention.py --dry-run --out /tmp/x.json  # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from vlmfix.kernels._common import IMAGE, IMAGE_SINK, TEXT, TEXT_SINK
from vlmfix.kernels.plan_attention import _plan_attention, plan_attention, plan_attention_reference

H, D = 32, 128
PREFILL_LENGTHS = (640, 2944, 8192)
DECODE_LENGTHS = (640, 2944, 16384)
DECODE_BATCHES = (1, 16)
TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}  # max abs error on unit-variance values


def llava_layout(b: int, length: int, device) -> dict:
    """Labels and positions like a LLaVA prompt: 35 text tokens, an image block of ~90% of
    the sequence with one sink every 64 image tokens, then text, ending in a text sink."""
    labels = torch.full((b, length), TEXT, dtype=torch.int8)
    start, end = min(35, length // 8), length - max(1, length // 10)
    labels[:, start:end] = IMAGE
    labels[:, start:end:64] = IMAGE_SINK
    labels[:, end] = TEXT_SINK
    pos = torch.arange(length).expand(b, length).contiguous()
    return dict(labels=labels.to(device), k_pos=pos.to(device), image_end=end)


def plan_inputs(b, hkv, tq, tk, dtype, device, *, pre=False, reweight=False, head_scale=False, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: decode caches reach 2 GiB
    q = torch.randn(b, H, tq, D, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, hkv, tk, D, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, hkv, tk, D, generator=gen, device=device, dtype=dtype)
    lay = llava_layout(b, tk, device)
    q_pos = lay["k_pos"][:, tk - tq :].contiguous()
    text_rows = q_pos >= lay["image_end"]  # the prompt after the image, and generated tokens
    kw = dict(labels=lay["labels"], q_pos=q_pos, k_pos=lay["k_pos"], scale=D**-0.5)
    is_img = (lay["labels"] == IMAGE) | (lay["labels"] == IMAGE_SINK)
    if pre:  # PAI: z + alpha |z| on image keys in the text rows
        kw["pre_rows"] = text_rows
        kw["pre_coef"] = (0.5 * is_img.float())[:, None, :].expand(b, H, tk).contiguous()
    if reweight:  # VAR
        kw["reweight"] = (text_rows, 0.4, 0.9, 0.2)
    if head_scale:
        kw["head_scale"] = torch.rand(b, H, generator=gen, device=device) + 0.5
    return (q, k, v), kw


def cuda_time_ms(fn, *, warmup=5, reps=30, graph=False) -> float:
    """Median ms per call over ``reps`` CUDA-event timings (of a graph replay of 10 calls when ``graph``)."""
    inner = 1
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        inner = 10
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        run = g.replay
        run()
    else:
        run = fn
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def check_correctness(device, *, dry_run: bool = False) -> list[dict]:
    """Kernel vs dense fp32 reference; ``dry_run``: tiny shapes, fp16 only (CPU interpreter)."""
    rows = []
    cases = [  # (B, Hkv, Tq, Tk, features, path)
        (2, 8, 300, 300, {}, "prefill"),
        (2, 8, 300, 300, dict(pre=True, reweight=True, head_scale=True), "prefill"),
        (1, 32, 577, 577, dict(pre=True), "prefill"),
        (2, 2, 1, 2944, {}, "decode"),
        (2, 8, 1, 2944, dict(pre=True, reweight=True, head_scale=True), "decode"),
        (1, 8, 4, 700, dict(pre=True, reweight=True), "decode"),
    ]
    dtypes = (torch.float16, torch.bfloat16)
    if dry_run:
        cases = [(1, 8, 70, 70, dict(pre=True, reweight=True, head_scale=True), "prefill"),
                 (1, 8, 1, 150, dict(pre=True, reweight=True, head_scale=True), "decode")]  # fmt: skip
        dtypes = (torch.float16,)  # bf16 is not exact under the interpreter
    for dtype in dtypes:
        for b, hkv, tq, tk, feats, path in cases:
            qkv, kw = plan_inputs(b, hkv, tq, tk, dtype, device, **feats, seed=1)
            out, sel = _plan_attention(*qkv, path=path, **kw)
            ref, ref_sel = plan_attention_reference(*qkv, **kw)
            err = (out.float() - ref.float()).abs().max().item()
            sel_diff = 0 if sel is None else int((sel != ref_sel).sum())
            ok = err <= TOL[dtype] and sel_diff == 0
            name = "+".join(feats) or "plain"
            rows.append(dict(dtype=str(dtype).removeprefix("torch."), path=path, shape=[b, H, hkv, tq, tk, D],
                             features=name, max_abs_err=err, selected_mismatch=sel_diff, ok=ok))  # fmt: skip
            print(f"check {rows[-1]['dtype']:8s} {path:7s} B={b} Hkv={hkv} Tq={tq} Tk={tk} {name:24s} "
                  f"max|err|={err:.2e} selected mismatches={sel_diff} {'ok' if ok else 'FAIL'}")  # fmt: skip
    return rows


def flex_pai(qkv, kw):
    """FlexAttention doing the same PAI edit as ``plan_inputs(pre=True)`` through a ``score_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = qkv
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    rows, coef = kw["pre_rows"], kw["pre_coef"]

    def score_mod(score, bi, hi, qi, ki):
        return score + torch.where(rows[bi, qi], coef[bi, hi, ki] * score.abs(), 0.0)

    def causal(bi, hi, qi, ki):
        return qi >= ki

    block_mask = create_block_mask(causal, b, None, tq, tk, device=q.device)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=kw["scale"])


def bench_prefill(device) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for length in PREFILL_LENGTHS:
        flops = 4 * H * D * length * length / 2
        variants = {}
        for name, feats in (("plan", {}), ("plan+PAI", dict(pre=True)), ("plan+VAR", dict(reweight=True))):
            qkv, kw = plan_inputs(1, H, length, length, torch.float16, device, **feats)
            variants[name] = lambda qkv=qkv, kw=kw: plan_attention(*qkv, **kw)
        qkv, kw = plan_inputs(1, H, length, length, torch.float16, device, pre=True)
        q, k, v = qkv

        def sdpa(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D**-0.5)

        variants["sdpa-flash"] = sdpa
        try:
            variants["flex+PAI score_mod"] = flex_pai(qkv, kw)
        except Exception as exc:  # FlexAttention unavailable on this torch / GPU
            print(f"FlexAttention skipped: {exc!r}", file=sys.stderr)
        for name, fn in variants.items():
            eager = cuda_time_ms(fn)
            try:  # GPU time: the same call replayed from a CUDA graph (no host launch cost)
                ms, timing = cuda_time_ms(fn, graph=True), "graph"
            except Exception as exc:  # e.g. a compiled function that cannot be captured
                print(f"{name} at L={length}: graph capture failed ({exc!r}); eager time", file=sys.stderr)
                ms, timing = eager, "eager"
            rows.append(
                dict(phase="prefill", L=length, batch=1, impl=name, ms=ms, eager_ms=eager, timing=timing,
                     tflops=flops / (ms * 1e-3) / 1e12)
            )  # fmt: skip
        base = next(r["ms"] for r in rows if r["L"] == length and r["impl"] == "sdpa-flash")
        for r in rows:
            if r["L"] == length:
                r["vs_sdpa"] = base / r["ms"]
    return rows


def bench_decode(device, copy_gbs: float) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for batch in DECODE_BATCHES:
        for length in DECODE_LENGTHS:
            nbytes = 2 * batch * H * length * D * 2  # K and V, fp16
            variants = {}
            for name, feats in (("plan", {}), ("plan+VAR", dict(reweight=True))):
                qkv, kw = plan_inputs(batch, H, 1, length, torch.float16, device, **feats)
                variants[name] = lambda qkv=qkv, kw=kw: plan_attention(*qkv, **kw)
            q, k, v = qkv

            def sdpa(q=q, k=k, v=v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)

            variants["sdpa-flash"] = sdpa
            for name, fn in variants.items():
                ms = cuda_time_ms(fn, graph=True)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(phase="decode", L=length, batch=batch, impl=name, ms=ms, gbs=gbs,
                                 frac_copy_bw=gbs / copy_gbs))  # fmt: skip
            base = next(r["ms"] for r in rows if (r["L"], r["batch"], r["impl"]) == (length, batch, "sdpa-flash"))
            for r in rows:
                if (r["L"], r["batch"]) == (length, batch):
                    r["vs_sdpa"] = base / r["ms"]
    return rows


def markdown(prefill, decode, copy_gbs, gpu) -> str:
    lines = [f"GPU: {gpu}; torch {torch.__version__}; fp16, {H} heads x {D}; cuDNN sdpa off", ""]
    lines += [
        "| prefill L | impl | ms (GPU) | TFLOP/s | x sdpa-flash speed | ms per eager call |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['L']} | {r['impl']} | {r['ms']:.3f}{'' if r.get('timing') == 'graph' else ' (eager)'} | "
        f"{r['tflops']:.1f} | {r['vs_sdpa']:.2f} | {r.get('eager_ms', r['ms']):.3f} |"
        for r in prefill
    ]
    lines += ["", f"Measured copy bandwidth: {copy_gbs:.0f} GB/s (read + write)", ""]
    lines += [
        "| decode batch | L | impl | us | GB/s | of copy bw | x sdpa-flash speed |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['L']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['gbs']:.0f} | {r['frac_copy_bw']:.0%} | "
        f"{r['vs_sdpa']:.2f} |"
        for r in decode
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON results file")
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1: tiny correctness checks only, no timing"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        checks = check_correctness(torch.device("cpu"), dry_run=True)
        with open(args.out, "w") as f:
            json.dump(dict(checks=checks), f, indent=1)
        return 0 if all(c["ok"] for c in checks) else 1
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --dry-run on the CPU with TRITON_INTERPRET=1)")
    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN sdpa rebuilds graphs per length (DESIGN.md §5)
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    checks = [] if args.skip_checks else check_correctness(device)
    copy_gbs = copy_bandwidth_gbs()
    prefill = bench_prefill(device)
    decode = bench_decode(device, copy_gbs)
    table = markdown(prefill, decode, copy_gbs, gpu)
    print(table)
    record = dict(gpu=gpu, torch=torch.__version__, heads=H, head_dim=D, copy_gbs=copy_gbs, checks=checks,
                  prefill=prefill, decode=decode, table=table)  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    failed = [c for c in checks if not c["ok"]]
    if failed:
        print(f"{len(failed)} correctness checks FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
