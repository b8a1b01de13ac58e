"""Constants and input checks shared by the Triton attention ops (no Triton import)."""

from __future__ import annotations

import torch

from vlmfix.errors import ConfigError

# Segment labels per key (int8). Image segments are {IMAGE, IMAGE_SINK}; text segments
# are {TEXT, TEXT_SINK}; PAD keys are never visible.
TEXT, TEXT_SINK, IMAGE, IMAGE_SINK, PAD = 0, 1, 2, 3, 4

HEAD_DIMS = (64, 80, 96, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_tensor(name: str, x, shape: tuple, dtypes: tuple | None = None, device=None) -> None:
    """``x`` is a tensor of exactly ``shape`` (None entries are free), one of ``dtypes``, on ``device``.

    Runs per attention call, so the messages are only built on failure."""
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ConfigError(f"{name} must have shape {want}, got {list(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ConfigError(f"{name} must have dtype in ({names}), got {str(x.dtype).removeprefix('torch.')}")
    if device is not None and x.device != device:
        raise ConfigError(f"{name} must be on {device} like q, got {x.device}")


INT_DTYPES = (torch.int32, torch.int64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_rank: int) -> None:
    """q ``[B, H, Tq, D]`` (or ``[B, H, D]`` when ``q_rank`` is 3); k, v ``[B, Hkv, Tk, D]``."""
    if not (isinstance(q, torch.Tensor) and q.dim() == q_rank):
        raise ConfigError(f"q must be a {q_rank}-d tensor, got {getattr(q, 'shape', q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ConfigError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    if d not in HEAD_DIMS:
        raise ConfigError(f"head dim D={d} is not supported; the kernels take D in {HEAD_DIMS}")
    check_tensor("k", k, (b, None, None, d), (q.dtype,), q.device)
    check_tensor("v", v, tuple(k.shape), (q.dtype,), q.device)
    hkv = k.shape[1]
    if hkv == 0 or h % hkv:
        raise ConfigError(f"q heads H={h} must be a multiple of k/v heads Hkv={hkv} (grouped-query attention)")


def check_scale(scale) -> None:
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ConfigError(f"scale must be a positive float (usually D ** -0.5), got {scale!r}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except in the last dim, which must be 1."""
    return x if x.stride(-1) == 1 else x.contiguous()
