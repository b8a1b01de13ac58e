"""Where a decode step's GPU time goes, plain vlmfix against one method, on a random
full-size model (diagnostic for the end-to-end decode ratios of docs/benchmarks.md).

Runs ``vlmfix.generate`` on the ``static`` decode path (the graph path's kernels, without
the graph, so the profiler sees each kernel) for ``--new-tokens`` tokens under
``torch.profiler`` and prints, per variant, the GPU time per decode step of the kernels
that differ most between plain and the method (prefill excluded: the profile covers a call
with ``--new-tokens`` minus a call with one token).

Usage::

    python benchmarks/profile_decode.py --model llava-next-7b --batch 2 --method var
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import vlmfix
from vlmfix.bench.models import build_model, make_batch
from vlmfix.testbed.results import parse_method_spec


def kernel_times(model, processor, images, prompts, methods, new_tokens):
    """GPU microseconds per kernel name of one call (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    def call(n):
        vlmfix.generate(model, processor, images, prompts, methods, max_new_tokens=n, decode_path="static")

    call(new_tokens)
    out = {}
    for n in (1, new_tokens):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call(n)
            torch.cuda.synchronize()
        times = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name] += e.device_time
        out[n] = times
    return {k: (out[new_tokens][k] - out[1].get(k, 0.0)) / (new_tokens - 1) for k in out[new_tokens]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-next-7b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--method", default="var", help="method spec, e.g. var or vhr:mode=one_pass")
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device("cuda")
    model, processor = build_model(args.model, device, torch.float16)
    images, prompts = make_batch(args.batch, 500 if "next" in args.model else 336)
    plain = kernel_times(model, processor, images, prompts, [], args.new_tokens)
    meth = kernel_times(model, processor, images, prompts, parse_method_spec(args.method), args.new_tokens)
    tp, tm = sum(plain.values()), sum(meth.values())
    print(f"{torch.cuda.get_device_name(device)}; {args.model}, batch {args.batch}: GPU us per decode step "
          f"plain {tp:.0f}, {args.method} {tm:.0f} ({tm / tp:.3f}x)")  # fmt: skip
    names = sorted(set(plain) | set(meth), key=lambda k: -abs(meth.get(k, 0.0) - plain.get(k, 0.0)))
    print(f"{'kernel':90s} {'plain':>9s} {args.method:>9s} {'diff':>9s}")
    for k in names[: args.top]:
        a, b = plain.get(k, 0.0), meth.get(k, 0.0)
        print(f"{k[:90]:90s} {a:9.1f} {b:9.1f} {b - a:+9.1f}")


if __name__ == "__main__":
    main()
