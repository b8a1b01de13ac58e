"""The kernels' real launches compile for an H100 (sm_90) without spilling many registers.

The CPU interpreter runs kernels that the GPU compiler would reject, so this compiles a
representative set of launches (``gpu_compile.py``: prefill, decode and last-row kernels,
every plan feature, fp16 and bf16, GQA, D = 64, 80, 96, 128) down to cubins with the ``ptxas``
that Triton ships, in a subprocess without ``TRITON_INTERPRET``, and checks the register
report: a few words of spill (the reweighting prefill with every feature on) are harmless,
hundreds of bytes mean that a block size no longer fits in registers. About a minute of CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kernel_inputs  # noqa: F401  (first: it switches on the interpreter before triton is imported)
import pytest

triton = pytest.importorskip("triton", reason="triton is not installed; the Triton kernel tests need it")

MAX_SPILL_BYTES = 64
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


@pytest.mark.skipif(_version(triton.__version__) < (3, 9), reason="the AOT compile API used is Triton 3.9's")
def test_kernels_compile_for_sm90_without_heavy_spills():
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(HERE / "gpu_compile.py")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) >= 10, proc.stdout
    for report in reports:
        assert 0 < report["regs"] <= 255, report
        assert report["stack"] <= MAX_SPILL_BYTES, f"register spills: {report}"
