"""Where the Triton kernels can run, and a clear error where they cannot.

The kernels run on CUDA devices, and on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported; slow, used by the CPU tests).
Nothing here imports Triton: only ``importlib.util.find_spec`` is used.

Example:
    >>> from vlmfix.kernels import dispatch
    >>> dispatch.available("cpu")  # doctest: +SKIP
    False
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from vlmfix.errors import BackendUnavailableError

__all__ = ["available", "interpreting", "require", "unavailable_reason"]


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    device = torch.device(device)
    if not _triton_installed():
        return "the 'triton' package is not installed (pip install triton; Linux x86_64 only)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "the tensors are on CUDA but torch.cuda.is_available() is False"
        return None
    if device.type == "cpu":
        if interpreting():
            if _imported_without_interpreter():
                return (
                    "TRITON_INTERPRET was set after triton had been imported, so Triton's own library "
                    "functions are compiled-only; set TRITON_INTERPRET=1 before the first import of triton"
                )
            return None
        return (
            "the tensors are on the CPU; the Triton kernels need a CUDA device, or Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing triton; slow, for tests)"
        )
    return f"device type {device.type!r} is not supported by the Triton kernels (CUDA only)"


def _imported_without_interpreter() -> bool:
    """True when triton was imported before ``TRITON_INTERPRET`` was set: its standard library
    (``tl.max``, ...) is then compiled-only and fails inside interpreted kernels."""
    if "triton" not in sys.modules:
        return False
    import triton.language as tl

    return type(tl.standard.max).__name__ != "InterpretedFunction"


def available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device`` in this process."""
    return unavailable_reason(device) is None


def require(device: torch.device | str) -> None:
    """Raise :class:`~vlmfix.errors.BackendUnavailableError` unless the kernels can run on ``device``."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend='triton' cannot run here: {reason}. Use backend='reference' (pure torch, any device)."
        )
