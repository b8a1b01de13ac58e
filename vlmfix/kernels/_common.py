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
    """``x`` is a tensor of exactly ``shape`` (None entries are free), one of ``dtypes``, on ``device``."""
    check(isinstance(x, torch.Tensor), f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = x.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, x.shape))
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    check(ok, f"{name} must have shape {want}, got {list(x.shape)}")
    if dtypes is not None:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        check(x.dtype in dtypes, f"{name} must have dtype in ({names}), got {str(x.dtype).removeprefix('torch.')}")
    if device is not None:
        check(x.device == device, f"{name} must be on {device} like q, got {x.device}")


INT_DTYPES = (torch.int32, torch.int64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_rank: int) -> None:
    """q ``[B, H, Tq, D]`` (or ``[B, H, D]`` when ``q_rank`` is 3); k, v ``[B, Hkv, Tk, D]``."""
    check(
        isinstance(q, torch.Tensor) and q.dim() == q_rank,
        f"q must be a {q_rank}-d tensor, got {getattr(q, 'shape', q)}",
    )
    check(q.dtype in FLOAT_DTYPES, f"q must be float16, bfloat16 or float32, got {q.dtype}")
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    check(d in HEAD_DIMS, f"head dim D={d} is not supported; the kernels take D in {HEAD_DIMS}")
    check_tensor("k", k, (b, None, None, d), (q.dtype,), q.device)
    check_tensor("v", v, tuple(k.shape), (q.dtype,), q.device)
    hkv = k.shape[1]
    check(
        hkv > 0 and h % hkv == 0, f"q heads H={h} must be a multiple of k/v heads Hkv={hkv} (grouped-query attention)"
    )


def check_scale(scale) -> None:
    check(
        isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0,
        f"scale must be a positive float (usually D ** -0.5), got {scale!r}",
    )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except in the last dim, which must be 1."""
    return x if x.stride(-1) == 1 else x.contiguous()
