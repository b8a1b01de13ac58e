"""Speed and accuracy of ``last_row_stats`` (Triton) against eager torch.

On one CUDA GPU, 32 heads x 128, fp16, one query row per sample, L in {640, 2944, 8192},
batch 1 and 8: GB/s of K/V read by the kernel and by the eager equivalent (scores, softmax,
masked softmax over the text keys, and its weighted sum of V), after a correctness check
against ``last_row_stats_reference`` in fp16 and bf16. CUDA events, warm-up, median; calls
timed as CUDA-graph replays. Prints a Markdown table and writes JSON to ``--out``.

Usage::

    python benchmarks/kernels/bench_row_stats.py --out row_stats.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark module, script use only

from bench_plan_attention import D, H, cuda_time_ms, llava_layout  # noqa: E402

from vlmfix.kernels._common import PAD, TEXT_SINK  # noqa: E402
from vlmfix.kernels.row_stats import last_row_stats, last_row_stats_reference  # noqa: E402

LENGTHS = (640, 2944, 8192)
BATCHES = (1, 8)
TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def inputs(b, length, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, H, D, generator=gen, device=device, dtype=dtype)
    k = torch.randn(b, H, length, D, generator=gen, device=device, dtype=dtype)
    v = torch.randn(b, H, length, D, generator=gen, device=device, dtype=dtype)
    lay = llava_layout(b, length, device)
    kw = dict(labels=lay["labels"], k_pos=lay["k_pos"], q_pos_row=lay["k_pos"][:, -1].contiguous(), scale=D**-0.5)
    return (q, k, v), kw


def eager(q, k, v, *, labels, k_pos, q_pos_row, scale):
    """What a method does without the kernel (fp32 scores of one row, two softmaxes)."""
    z = torch.einsum("bhd,bhjd->bhj", q, k).float() * scale
    visible = ((labels != PAD) & (k_pos <= q_pos_row[:, None]))[:, None, :]
    probs = torch.softmax(z.masked_fill(~visible, float("-inf")), dim=-1)
    text = visible & (labels <= TEXT_SINK)[:, None, :]
    p_text = torch.softmax(z.masked_fill(~text, float("-inf")), dim=-1)
    return probs, torch.einsum("bhj,bhjd->bhd", p_text.to(v.dtype), v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="path of the JSON results file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    checks = []
    for dtype in (torch.float16, torch.bfloat16):
        for b, length in ((2, 700), (1, 2944)):
            qkv, kw = inputs(b, length, dtype, device, seed=1)
            probs, out = last_row_stats(*qkv, **kw)
            ref_probs, ref_out = last_row_stats_reference(*qkv, **kw)
            err_p = (probs - ref_probs).abs().max().item()
            err_o = (out.float() - ref_out.float()).abs().max().item()
            ok = err_p <= 1e-4 and err_o <= TOL[dtype]
            checks.append(dict(dtype=str(dtype), B=b, L=length, probs_err=err_p, out_err=err_o, ok=ok))
            print(
                f"check {dtype} B={b} L={length} max|dprobs|={err_p:.2e} max|dout|={err_o:.2e} {'ok' if ok else 'FAIL'}"
            )
    rows = []
    for b in BATCHES:
        for length in LENGTHS:
            qkv, kw = inputs(b, length, torch.float16, device)
            nbytes = 2 * b * H * length * D * 2
            for name, fn in (("triton", last_row_stats), ("eager", eager)):
                ms = cuda_time_ms(lambda fn=fn, qkv=qkv, kw=kw: fn(*qkv, **kw), graph=True)
                rows.append(dict(batch=b, L=length, impl=name, ms=ms, gbs=nbytes / (ms * 1e-3) / 1e9))
    lines = [f"GPU: {gpu}; torch {torch.__version__}; fp16, {H} heads x {D}", ""]
    lines += ["| batch | L | impl | us | GB/s (K+V) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['L']} | {r['impl']} | {r['ms'] * 1e3:.1f} | {r['gbs']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, checks=checks, rows=rows, table=table), f, indent=1)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
