"""Importing the evaluation packages must stay light: no torch, matplotlib or accelerate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CODE = """
import sys
import vlmfix
before = {m for m in ("torch", "matplotlib", "accelerate", "pycocotools") if m in sys.modules}
import vlmfix.eval, vlmfix.eval.pope, vlmfix.eval.chair, vlmfix.eval.cli, vlmfix.eval.runner, vlmfix.eval.report
after = {m for m in ("torch", "matplotlib", "accelerate", "pycocotools") if m in sys.modules}
print(sorted(after - before))
"""


def test_eval_imports_do_not_pull_heavy_modules():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
