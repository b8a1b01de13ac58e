"""Pure-torch attention with the edit points every vlmfix method needs.

This is the ``reference`` backend: any device, any dtype, exact. It materialises the
``[B, H, Tq, Tk]`` score matrix only when an edit asks for it; plain attention goes
through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["attention", "expand_kv", "as_bool_mask"]

ScoreMod = Callable[[torch.Tensor], torch.Tensor]


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
    score_mods: list[ScoreMod] = (),
    prob_mods: list[ScoreMod] = (),
    explicit: bool = False,
) -> torch.Tensor:
    """Attention with optional pre- and post-softmax edits.

    Args:
        query: ``[B, H, Tq, D]``.
        key, value: ``[B, Hkv, Tk, D]`` (H divisible by Hkv).
        mask: bool ``[B or 1, 1, Tq, Tk]``, True where a query may attend a key; None
            means plain causal attention with the queries at the end of the keys (no
            padding), which lets plain attention use flash kernels.
        scaling: score scale (usually ``D ** -0.5``).
        score_mods: functions ``scores[B,H,Tq,Tk] (fp32, before masking) -> scores``
            applied in order before the softmax.
        prob_mods: functions ``probs[B,H,Tq,Tk] (fp32) -> probs`` applied after it.
        explicit: force the explicit softmax path even with no edits (for testing).

    Returns:
        ``[B, H, Tq, D]`` in the query's dtype. Rows with no visible key give zeros.
    """
    n_rep = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is not None:
        # A query row that may attend nothing (a left-pad position) would give NaN, and
        # NaN values would leak into real rows through P @ V. Let such rows see every
        # key: their outputs are never used, and everything stays finite. (No host sync.)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    if not (score_mods or prob_mods or explicit):
        k, v = expand_kv(key, n_rep), expand_kv(value, n_rep)
        if mask is None and q_len == 1:  # decode without padding: every key is visible
            return F.scaled_dot_product_attention(query, k, v, scale=scaling)
        if mask is None and q_len == k_len:  # prefill without padding: flash-eligible
            return F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        if mask is None:
            mask = as_bool_mask(None, q_len, k_len, query.device)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    if mask is None:
        mask = as_bool_mask(None, q_len, k_len, query.device)
    k = expand_kv(key, n_rep).float()
    v = expand_kv(value, n_rep).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    for mod in score_mods:
        scores = mod(scores)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    for mod in prob_mods:
        probs = mod(probs)
    return torch.matmul(probs, v).to(query.dtype)
