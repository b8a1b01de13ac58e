"""Kernel tier: the Triton kernels against their pure-torch references.

Without a CUDA device the kernels run under Triton's CPU interpreter. ``TRITON_INTERPRET``
is read when a kernel is defined, and vlmfix defines its kernels on first use, so setting it
here (before any test of this tier runs) is enough; vlmfix itself never sets it.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
