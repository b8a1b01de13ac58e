"""Per-key attention probabilities of one query row per sample, and its output without image keys (Triton).

What FastV / PyramidDrop-style token ranking, AvisC's blind tokens and VHR's head
divergence need from the last query row (DESIGN.md §5), in O(H·Tk·D) beside the main pass:
the unedited softmax over the visible keys, and the attention output restricted to the text
segments {TEXT, TEXT_SINK}. One program handles every query head of one KV head, so K and
V are read once per KV head. The Triton code lives in ``_row_stats_kernels`` and is imported
on first use.

``last_row_stats_reference`` beside it computes the same thing densely in fp32.
"""

from __future__ import annotations

import torch

from vlmfix.kernels import _common as C
from vlmfix.kernels import dispatch

__all__ = ["last_row_stats", "last_row_stats_reference"]


def _validate(q_row, k, v, labels, k_pos, q_pos_row, scale):
    C.check_qkv(q_row, k, v, q_rank=3)
    b, tk = q_row.shape[0], k.shape[2]
    C.check_tensor("labels", labels, (b, tk), (torch.int8,), q_row.device)
    C.check_tensor("k_pos", k_pos, (b, tk), C.INT_DTYPES, q_row.device)
    C.check_tensor("q_pos_row", q_pos_row, (b,), C.INT_DTYPES, q_row.device)
    C.check_scale(scale)


def last_row_stats(
    q_row: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    labels: torch.Tensor,
    k_pos: torch.Tensor,
    q_pos_row: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of one query row per sample, and its text-only output.

    Args:
        q_row: ``[B, H, D]`` one query row per sample (e.g. the last prompt token), float16 /
            bfloat16 (float32 accepted, for interpreter tests); D in {64, 80, 96, 128}.
        k, v: ``[B, Hkv, Tk, D]``, q_row's dtype; ``H % Hkv == 0``.
        labels: int8 ``[B, Tk]`` segment per key (TEXT=0, TEXT_SINK=1, IMAGE=2,
            IMAGE_SINK=3, PAD=4).
        k_pos: int32/int64 ``[B, Tk]`` key positions.
        q_pos_row: int32/int64 ``[B]`` the row's position; key j is visible iff
            ``labels[b, j] != PAD and k_pos[b, j] <= q_pos_row[b]``.
        scale: score scale, usually ``D ** -0.5``. Scores are not edited.

    Returns:
        ``(probs, out_noimg)``: probs float32 ``[B, H, Tk]``, the softmax over visible keys
        (0 elsewhere; all 0 when nothing is visible); out_noimg ``[B, H, D]`` in q_row's
        dtype, attention restricted to the text segments (zeros where no text key is visible).

    Example:
        >>> probs, out_noimg = last_row_stats(q[:, :, -1], k, v, labels=labels, k_pos=pos,
        ...                                   q_pos_row=pos[:, -1], scale=0.088)  # doctest: +SKIP
    """
    _validate(q_row, k, v, labels, k_pos, q_pos_row, scale)
    if not torch.compiler.is_compiling():  # the op checks again when it runs
        dispatch.require(q_row.device)
    q_row, k, v = (C.last_dim_contiguous(x) for x in (q_row, k, v))
    return torch.ops.vlmfix.last_row_stats(q_row, k, v, labels, k_pos, q_pos_row, float(scale))


@torch.library.custom_op("vlmfix::last_row_stats", mutates_args=())
def _last_row_stats_op(
    q_row: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    labels: torch.Tensor,
    k_pos: torch.Tensor,
    q_pos_row: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from vlmfix.kernels import _row_stats_kernels as K

    return K.launch(q_row, k, v, labels, k_pos, q_pos_row, scale)


@_last_row_stats_op.register_fake
def _(q_row, k, v, labels, k_pos, q_pos_row, scale):
    b, h, d = q_row.shape
    probs = q_row.new_empty((b, h, k.shape[2]), dtype=torch.float32)
    return probs, q_row.new_empty((b, h, d))


def last_row_stats_reference(
    q_row: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    labels: torch.Tensor,
    k_pos: torch.Tensor,
    q_pos_row: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 pure-torch ``last_row_stats`` (same arguments and returns)."""
    _validate(q_row, k, v, labels, k_pos, q_pos_row, scale)
    n_rep = q_row.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(n_rep, dim=1)
    vf = v.float().repeat_interleave(n_rep, dim=1)
    z = torch.einsum("bhd,bhjd->bhj", q_row.float(), kf) * scale
    visible = ((labels != C.PAD) & (k_pos <= q_pos_row[:, None]))[:, None, :]
    probs = torch.softmax(z.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    text = visible & ((labels == C.TEXT) | (labels == C.TEXT_SINK))[:, None, :]
    p_text = torch.softmax(z.masked_fill(~text, float("-inf")), dim=-1).nan_to_num(0.0)
    out_noimg = torch.einsum("bhj,bhjd->bhd", p_text, vf)
    return probs, out_noimg.to(q_row.dtype)
