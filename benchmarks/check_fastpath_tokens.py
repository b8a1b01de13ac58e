"""Do the eager and fast decode paths give the same greedy tokens on a full-size model?

Builds a random LLaVA-1.5-7B from its config (``vlmfix.bench.models``), then for each
method runs ``vlmfix.generate`` twice on the same left-padded batch, ``decode_path="eager"``
(DynamicCache, one Python step per token) and ``decode_path="graph"`` (static cache, one
captured CUDA graph), and compares the tokens. The two paths run different attention
kernels over different key lengths (the static cache attends over its whole capacity,
masked), so their logits agree to rounding, not bit for bit; where the tokens part, the
script prints the eager path's margin between its top two logits at that step (a near-tie
that rounding decides) beside the largest logit difference before it.

The decode step of the second and later calls of a method is a replay of the kept graph
(``decode["reused"]``): each method runs three batches so that reused steps are compared.

Usage::

    python benchmarks/check_fastpath_tokens.py [--dtype float16|bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json

import torch

import vlmfix
from vlmfix.bench.models import build_llava_7b, make_batch

METHODS = {
    "plain": lambda: [],
    "var": lambda: [vlmfix.VAR()],
    "pai": lambda: [vlmfix.PAI()],
    "paint": lambda: [vlmfix.PAINT()],
    "vhr": lambda: [vlmfix.VHR()],
    "vcd": lambda: [vlmfix.VCD()],
}


def compare(model, processor, methods, images, prompts, tokens):
    kw = dict(max_new_tokens=tokens, return_scores=True)
    eager = vlmfix.generate(model, processor, images, prompts, methods(), decode_path="eager", **kw)
    fast = vlmfix.generate(model, processor, images, prompts, methods(), decode_path="graph", max_new_tokens=tokens)
    rows = []
    for b, (e, f) in enumerate(zip(eager.token_ids, fast.token_ids)):
        n = next((i for i, (x, y) in enumerate(zip(e, f)) if x != y), None)
        if n is None and len(e) != len(f):
            n = min(len(e), len(f))
        row = {"sample": b, "same": n is None, "tokens": len(e)}
        if n is not None:
            s = eager.scores[b][n].float()
            top = s.topk(2).values
            row.update(first_difference=n, eager_top2_margin=round(float(top[0] - top[1]), 5))
        rows.append(row)
    return rows, fast.decode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: the graph path needs a GPU (the CPU tests cover the tiny models)")
    torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device("cuda")
    model, processor = build_llava_7b(device, getattr(torch, args.dtype))
    results = {"device": torch.cuda.get_device_name(device), "dtype": args.dtype, "methods": {}}
    for name in args.methods:
        runs = []
        for seed in range(3):
            images, prompts = make_batch(args.batch, 336, seed=seed)
            rows, decode = compare(model, processor, METHODS[name], images, prompts, args.tokens)
            runs.append({"seed": seed, "reused": decode["reused"], "path": decode["path"], "samples": rows})
            same = sum(r["same"] for r in rows)
            extra = "; ".join(
                f"sample {r['sample']} parts at token {r['first_difference']} (eager top-2 margin {r['eager_top2_margin']})"
                for r in rows
                if not r["same"]
            )
            print(f"{name:6s} batch {seed}: {same}/{len(rows)} identical, path {decode['path']}, "
                  f"reused {decode['reused']}{'; ' + extra if extra else ''}", flush=True)  # fmt: skip
        results["methods"][name] = runs
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
