"""The ``reference`` backend: pure-torch execution of attention plans.

Any device, any dtype, exact (scores, softmax and the value product accumulate in fp32;
on CUDA half-precision operands are not copied to fp32 first: see :func:`matmul_fp32`). It
materialises the ``[B, H, Tq, Tk]``
score matrix only when a plan edits scores or probabilities; plain attention (and a
head-scale-only plan) goes through ``torch.nn.functional.scaled_dot_product_attention``.
Row statistics (:func:`plan_row_stats`) are computed beside the main pass, before any
edit, from the last query row alone (``O(H * Tk * D)``). See :mod:`vlmfix.plan` for what a plan means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vlmfix.plan import AttentionPlan, PlanResult, RowStats

PAD = 4  # vlmfix.layout.Label.PAD (not imported: this module stays free of vlmfix imports)
IMAGE, IMAGE_SINK = 2, 3

__all__ = [
    "attention",
    "expand_kv",
    "as_bool_mask",
    "execute",
    "matmul_fp32",
    "probs_matmul_fp32",
    "row_stats",
    "plan_row_stats",
    "visible_mask",
]

_HALF = (torch.float16, torch.bfloat16)
_FP32_OUT: bool | None = None  # torch.bmm(..., out_dtype=torch.float32) works here (learnt at first use)


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``(a * scale) @ b`` in fp32 for ``[..., M, K] @ [..., K, N]`` operands of one dtype
    (on CUDA with half-precision operands, ``(a @ b) * scale``).

    On CUDA, half-precision operands go to cuBLAS as they are, with fp32 accumulation and
    an fp32 result (``torch.bmm(..., out_dtype=torch.float32)``): a product of two fp16 or
    bf16 numbers is exact in fp32, so this is the fp32 product without first copying a
    whole KV cache to fp32 (in a decode step that copy, per edited layer, was most of the
    cost of an edited plan). Elsewhere, or where that op is missing, both go to fp32.
    """
    global _FP32_OUT
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype and _FP32_OUT is not False:
        lead = a.shape[:-2]
        try:
            out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT = False
        else:
            _FP32_OUT = True
            out = out.view(*lead, a.shape[-2], b.shape[-1])
            return out if scale is None else out.mul_(scale)
    a = a.float() if scale is None else a.float() * scale
    return torch.matmul(a, b.float())


_SPLIT_MIN = 1 << 22  # values below this many elements are cheaper to copy to fp32 (eager launches)


def probs_matmul_fp32(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` in fp32 for fp32 probabilities ``[..., M, T]`` in ``[0, 1]`` and values
    ``[..., T, D]``.

    With large half-precision ``v`` on CUDA, ``v`` is not copied to fp32: the probabilities
    are split into half-precision terms ``p = p1 + p2 (+ p3)`` (two for fp16, three for
    bf16: 22 / 24 significant bits), each multiplied with ``v`` by :func:`matmul_fp32` and
    summed in fp32. The split loses at most fp16's smallest step (``2**-25``) per
    probability, which over ``T`` keys is the size of fp32's own summation error. Small
    ``v`` (a few million elements) and other devices: ``probs @ v.float()``, fewer kernels.
    """
    if not (v.is_cuda and v.dtype in _HALF and v.numel() >= _SPLIT_MIN and _FP32_OUT is not False):
        return torch.matmul(probs, v.float())
    rest, out = probs, None
    for _ in range(2 if v.dtype == torch.float16 else 3):
        term = rest.to(v.dtype)
        part = matmul_fp32(term, v)
        out = part if out is None else out.add_(part)
        rest = rest - term.float()
    return out


def expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, Hkv * n_rep, T, D]`` (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def as_bool_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """Turn transformers' mask (bool ``True``=attend, or additive float) into a bool
    ``[B or 1, 1, Tq, Tk]`` mask; ``None`` means causal with queries at the end."""
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        return (k_pos <= q_pos)[None, None]
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[..., -k_len:]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    *,
    explicit: bool = False,
    guarded: bool = False,
) -> torch.Tensor:
    """Plain attention (no edits).

    Args:
        query: ``[B, H, Tq, D]``.
        key, value: ``[B, Hkv, Tk, D]`` (H divisible by Hkv).
        mask: bool ``[B or 1, 1, Tq, Tk]``, True where a query may attend a key; None
            means plain causal attention with the queries at the end of the keys (no
            padding), which lets plain attention use flash kernels.
        scaling: score scale (usually ``D ** -0.5``).
        explicit: compute the softmax explicitly in fp32 (for testing the fast path).
        guarded: ``mask`` already lets every row see at least one key.

    Returns:
        ``[B, H, Tq, D]`` in the query's dtype.
    """
    n_rep = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is not None and not guarded:
        # A query row that may attend nothing (a left-pad position) would give NaN, and
        # NaN values would leak into real rows through P @ V. Let such rows see every
        # key: their outputs are never used, and everything stays finite. (No host sync.)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    k, v = expand_kv(key, n_rep), expand_kv(value, n_rep)
    if not explicit:
        if mask is None and q_len == 1:  # decode without padding: every key is visible
            return F.scaled_dot_product_attention(query, k, v, scale=scaling)
        if mask is None and q_len == k_len:  # prefill without padding: flash-eligible
            return F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        if mask is None:
            mask = as_bool_mask(None, q_len, k_len, query.device)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    if mask is None:
        mask = as_bool_mask(None, q_len, k_len, query.device)
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float()).to(query.dtype)


def visible_mask(labels: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, 1, Tq, Tk]``: key ``j`` visible to query ``i`` (``labels != PAD`` and
    ``k_pos[j] <= q_pos[i]``), from token positions rather than indices."""
    return ((k_pos[:, None, :] <= q_pos[:, :, None]) & (labels != PAD)[:, None, :])[:, None]


def row_stats(query, key, value, visible_row: torch.Tensor, labels: torch.Tensor, scaling: float) -> RowStats:
    """:class:`~vlmfix.plan.RowStats` of the last query row, on unedited scores.

    Args:
        query: ``[B, H, Tq, D]`` (the last row is used).
        key, value: ``[B, Hkv, Tk, D]``.
        visible_row: bool ``[B, Tk]``, the keys the last row sees.
        labels: int8 ``[B, Tk]``.
        scaling: score scale.
    """
    from vlmfix.plan import RowStats

    n_rep = query.shape[1] // key.shape[1]
    k = expand_kv(key, n_rep).float()
    v = expand_kv(value, n_rep).float()
    z = (query[:, :, -1:].float() @ k.transpose(-1, -2))[:, :, 0] * scaling  # [B, H, Tk]
    probs = torch.softmax(z.masked_fill(~visible_row[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    out = (probs[:, :, None, :] @ v)[:, :, 0]
    text = visible_row & (labels < IMAGE)
    p_text = torch.softmax(z.masked_fill(~text[:, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
    out_text = (p_text[:, :, None, :] @ v)[:, :, 0]
    return RowStats(probs=probs, out=out, out_text=out_text)


def plan_row_stats(query, key, value, plan: AttentionPlan, scaling: float) -> RowStats:
    """:func:`row_stats` of a plan's last query row (its visible keys from ``plan.mask``)."""
    vis_row = plan.mask[:, 0, -1] if plan.mask is not None else plan.labels != PAD
    return row_stats(query, key, value, vis_row, plan.labels, scaling)


def _reweight(probs: torch.Tensor, labels: torch.Tensor, rw) -> tuple[torch.Tensor, torch.Tensor]:
    weights = rw.weights
    if weights is None:
        sink = labels == IMAGE_SINK
        weights = torch.stack(((labels == IMAGE) | sink, sink), dim=-1).to(probs.dtype)[:, None]  # [B, 1, Tk, 2]
    masses = torch.matmul(probs, weights)  # [B, H, Tq, 2]: image mass, sink mass
    p_img, p_sink = masses.unbind(-1)
    p_rest = p_img - p_sink
    selected = (p_img >= rw.min_mass) & (p_sink > 0) & (p_sink <= rw.rho * p_img) & (p_rest > 0)
    selected = selected & rw.rows[:, None, :]
    # factor - 1 = gain on every image key + (p - 1 - gain) on sinks, where
    # gain = (1 - p) P_sink / P_rest (so sinks get p, other image keys 1 + gain, text 1)
    gain = torch.where(selected, (1 - rw.p) * p_sink / p_rest.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    drop = torch.where(selected, rw.p - 1 - gain, 0.0)
    delta = torch.matmul(torch.stack((gain, drop), dim=-1), weights.transpose(-1, -2))  # [B, H, Tq, Tk]
    return probs.addcmul(probs, delta), selected


def execute(query, key, value, plan: AttentionPlan, scaling: float) -> tuple[torch.Tensor, PlanResult]:
    """Execute one :class:`~vlmfix.plan.AttentionPlan`.

    Args:
        query: ``[B, H, Tq, D]``; key, value: ``[B, Hkv, Tk, D]``.
        plan: the call's plan (``plan.mask`` must hold the visible mask, with every row
            seeing at least one key, unless ``plan.plain_causal``).
        scaling: score scale.

    Returns:
        ``(out[B, H, Tq, D] in the query's dtype, PlanResult)``.
    """
    from vlmfix.plan import PlanResult

    result = PlanResult()
    mask = plan.mask
    if plan.score_coef is None and plan.reweight is None:
        out = attention(query, key, value, None if plan.plain_causal else mask, scaling, guarded=True)
    else:
        n_rep = query.shape[1] // key.shape[1]
        q_len, k_len = query.shape[2], key.shape[2]
        if mask is None and q_len > 1:
            mask = as_bool_mask(None, q_len, k_len, query.device)
        k = expand_kv(key, n_rep)
        v = expand_kv(value, n_rep)
        z = matmul_fp32(query, k.transpose(-1, -2), scaling)
        if plan.score_coef is not None:
            coef = plan.score_coef[:, :, None, :]
            if plan.score_rows is not None:
                coef = coef * plan.score_rows[:, None, :, None]
            z = z.addcmul_(coef, z.abs())
        if mask is not None:  # (a decode row without padding sees every key)
            z = z.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(z, dim=-1)
        if plan.reweight is not None:
            probs, result.selected = _reweight(probs, plan.labels, plan.reweight)
        out = probs_matmul_fp32(probs, v).to(query.dtype)
    if plan.head_scale is not None:
        out = out * plan.head_scale[:, :, None, None].to(out.dtype)
    return out, result
