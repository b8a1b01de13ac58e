"""Compile the kernels' real launches for an NVIDIA GPU target without a GPU (``python gpu_compile.py``).

The interpreter accepts code that Triton's compiler rejects (non-constexpr globals,
loop-carried values that change type, ...), so the CPU tier also compiles a representative
set of launches for sm_90 down to a cubin (Triton ships ``ptxas``) and prints, per launch,
a JSON line with the registers and stack bytes (spills) that ``cuobjdump`` reports. Run in a
separate process: ``TRITON_INTERPRET`` must be unset when the kernels are defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vlmfix.kernels import _plan_attention_kernels as P  # noqa: E402
from vlmfix.kernels import _row_stats_kernels as R  # noqa: E402

POINTER = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
    torch.uint8: "*u8", torch.int64: "*i64", torch.int32: "*i32",
}  # fmt: skip


def compile_launch(kernel, args, meta, capability=90):
    """``triton.compile`` of one launch, specialised like the JIT does (ints equal to 1 become
    constants; ints divisible by 16 and pointers are marked 16-aligned)."""
    sig, consts, attrs = {}, {}, {}
    it = iter(args)
    for idx, param in enumerate(kernel.params):
        if param.is_constexpr:
            sig[param.name] = "constexpr"
            consts[param.name] = meta[param.name]
            continue
        arg = next(it)
        if isinstance(arg, torch.Tensor):
            sig[param.name] = POINTER[arg.dtype]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, int) and arg == 1:  # the JIT turns ints equal to 1 into constants
            sig[param.name] = "constexpr"
            consts[param.name] = 1
        elif isinstance(arg, int):
            sig[param.name] = "i32" if abs(arg) < 2**31 else "i64"
            if arg % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            sig[param.name] = "fp32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    options = {key: meta[key] for key in ("num_warps", "num_stages") if key in meta}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def resource_usage(compiled) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":", 1) for line in text.splitlines() if "REG:" in line for item in line.split())
    return {"regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1))}


def plan_case(b, h, hkv, tq, tk, d, dtype, *, pre=False, rw=False, hs=False, path="auto"):
    q = torch.zeros(b, h, tq, d, dtype=dtype)
    k = torch.zeros(b, hkv, tk, d, dtype=dtype)
    labels = torch.zeros(b, tk, dtype=torch.int8)
    k_pos = torch.arange(tk).expand(b, tk).contiguous()
    q_pos = k_pos[:, tk - tq :].contiguous()
    pre_rows = torch.ones(b, tq, dtype=torch.bool) if pre else None
    pre_coef = torch.zeros(b, h, tk) if pre else None
    rw_rows = torch.ones(b, tq, dtype=torch.bool) if rw else None
    head_scale = torch.ones(b, h) if hs else None
    return P.plan_launches(q, k, k, labels, q_pos, k_pos, 0.1, pre_rows, pre_coef, rw_rows, 0.3, 0.5, 0.1, head_scale,
                           path=path, num_splits=0, decode_max_q=8)[2]  # fmt: skip


def row_stats_case(b, h, hkv, tk, d, dtype):
    q = torch.zeros(b, h, d, dtype=dtype)
    k = torch.zeros(b, hkv, tk, d, dtype=dtype)
    labels = torch.zeros(b, tk, dtype=torch.int8)
    k_pos = torch.arange(tk).expand(b, tk).contiguous()
    return R.plan_launches(q, k, k, labels, k_pos, k_pos[:, -1].contiguous(), 0.1)[2]


CASES = {
    "prefill plain fp16 D128": lambda: plan_case(1, 32, 32, 640, 640, 128, torch.float16),
    "prefill PAI fp16 D128": lambda: plan_case(1, 32, 32, 640, 640, 128, torch.float16, pre=True),
    "prefill VAR fp16 D128": lambda: plan_case(1, 32, 32, 640, 640, 128, torch.float16, rw=True),
    "prefill all bf16 D80 GQA7": lambda: plan_case(2, 28, 4, 640, 640, 80, torch.bfloat16, pre=True, rw=True, hs=True),
    "prefill plain bf16 D96": lambda: plan_case(1, 8, 8, 640, 640, 96, torch.bfloat16),
    "decode plain fp16 D128": lambda: plan_case(16, 32, 32, 1, 2944, 128, torch.float16),
    "decode all fp16 D128": lambda: plan_case(1, 32, 32, 1, 2944, 128, torch.float16, pre=True, rw=True, hs=True),
    "decode all bf16 D64 GQA8 q8": lambda: plan_case(1, 32, 4, 8, 2944, 64, torch.bfloat16, pre=True, rw=True),
    "prefill one token fp16 D64": lambda: plan_case(
        1, 1, 1, 1, 1, 64, torch.float16, pre=True, rw=True, path="prefill"
    ),
    "decode one key fp16 D64": lambda: plan_case(1, 1, 1, 1, 1, 64, torch.float16, pre=True, rw=True, hs=True),
    "row stats one key fp16 D64": lambda: row_stats_case(1, 1, 1, 1, 64, torch.float16),
    "row stats fp16 D128": lambda: row_stats_case(1, 32, 32, 2944, 128, torch.float16),
    "row stats bf16 D80 GQA7": lambda: row_stats_case(1, 28, 4, 2944, 80, torch.bfloat16),
}


def main(names) -> int:
    for name in names or CASES:
        for kernel, _grid, args, meta in CASES[name]():
            usage = resource_usage(compile_launch(kernel, args, meta))
            print(json.dumps(dict(case=name, kernel=kernel.__name__, **usage)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
