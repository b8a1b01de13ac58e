"""The ``triton`` backend: executes attention plans with vlmfix's Triton kernels.

A plan that edits scores or probabilities (PAI, PAINT, VAR) runs in one fused pass
(:func:`vlmfix.kernels.plan_attention.plan_attention`: flash-style prefill, split-KV decode);
row statistics come from :func:`vlmfix.kernels.row_stats.last_row_stats`. A plan with no
such edit (plain attention, or VHR's head scales alone) keeps PyTorch's flash
``scaled_dot_product_attention``, which the kernels would only match. Calls the kernels do
not cover (a head dim outside {64, 80, 96, 128}, a custom 4D mask, fp32 tensors on a GPU)
run on the reference backend; the first such call per reason is logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from vlmfix.kernels import reference

if TYPE_CHECKING:
    from vlmfix.plan import AttentionPlan, PlanResult

__all__ = ["execute", "execute_static", "row_stats", "unsupported_reason"]

logger = logging.getLogger(__name__)

HEAD_DIMS = (64, 80, 96, 128)
_LOGGED: set[str] = set()


def unsupported_reason(query: torch.Tensor, plan: AttentionPlan) -> str | None:
    """Why this call cannot run on the kernels (None when it can)."""
    if query.shape[-1] not in HEAD_DIMS:
        return f"head dim {query.shape[-1]} is not one of {HEAD_DIMS}"
    if plan.custom_mask:
        return "a custom attention mask"
    if query.device.type == "cuda" and query.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {query.dtype} (the GPU kernels take float16 / bfloat16)"
    return None


def _fallback(reason: str) -> None:
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        logger.info("vlmfix: triton backend runs this call on the reference backend: %s", reason)


def row_stats(query, key, value, plan: AttentionPlan, scaling: float):
    """:class:`~vlmfix.plan.RowStats` of the last query row (unedited scores)."""
    from vlmfix.kernels.row_stats import last_row_stats
    from vlmfix.plan import RowStats

    reason = unsupported_reason(query, plan)
    if reason is not None:
        _fallback(reason)
        return reference.plan_row_stats(query, key, value, plan, scaling)
    probs, out_text = last_row_stats(
        query[:, :, -1], key, value, labels=plan.labels, k_pos=plan.k_pos, q_pos_row=plan.q_pos[:, -1], scale=scaling
    )
    n_rep = query.shape[1] // key.shape[1]
    out = torch.matmul(probs[:, :, None, :], reference.expand_kv(value, n_rep).float())[:, :, 0]
    return RowStats(probs=probs, out=out, out_text=out_text.float())


def execute(
    query, key, value, plan: AttentionPlan, scaling: float, *, plain_kernel: bool = False
) -> tuple[torch.Tensor, PlanResult]:
    """Execute one plan; same contract as :func:`vlmfix.kernels.reference.execute`.

    ``plain_kernel``: run plans without score edits on the kernel too (the static decode
    path, where PyTorch's sdpa would take a masked, non-flash kernel over the whole cache
    capacity and the split-KV kernel is faster)."""
    from vlmfix.plan import PlanResult

    if plan.score_coef is None and plan.reweight is None and not plain_kernel:
        return reference.execute(query, key, value, plan, scaling)  # sdpa (flash) + head scales
    reason = unsupported_reason(query, plan)
    if reason is not None:
        _fallback(reason)
        return reference.execute(query, key, value, plan, scaling)
    from vlmfix.kernels import plan_attention as _ops  # noqa: F401  (registers torch.ops.vlmfix)

    B, H, Tq, _ = query.shape
    Tk = key.shape[2]
    pre_rows = pre_coef = None
    if plan.score_coef is not None:
        pre_coef = plan.score_coef.float().expand(B, H, Tk)
        pre_rows = plan.score_rows
        if pre_rows is None:
            pre_rows = _all_rows(B, Tq, query.device)
        else:
            pre_rows = pre_rows.expand(B, Tq)
    rw_rows, rw_p, rw_rho, rw_min = None, 1.0, 1.0, 0.0
    if plan.reweight is not None:
        rw = plan.reweight
        rw_rows, rw_p, rw_rho, rw_min = rw.rows.expand(B, Tq), float(rw.p), float(rw.rho), float(rw.min_mass)
    head_scale = plan.head_scale.float() if plan.head_scale is not None else None
    # The op directly: vlmfix built these inputs itself, so the public function's argument
    # checks (tens of microseconds per call, every layer of every step) are skipped.
    out, selected = torch.ops.vlmfix.plan_attention(
        query, key, value, plan.labels, plan.q_pos, plan.k_pos, float(scaling),
        pre_rows, pre_coef, rw_rows, rw_p, rw_rho, rw_min, head_scale, "auto", 0,
    )  # fmt: skip
    return out, PlanResult(selected=selected if plan.reweight is not None else None)


def execute_static(query, key, value, plan: AttentionPlan, scaling: float) -> tuple[torch.Tensor, PlanResult]:
    """:func:`execute` for static decode calls (every plan on the kernels)."""
    return execute(query, key, value, plan, scaling, plain_kernel=True)


_ROWS: dict = {}


def _all_rows(B: int, Tq: int, device) -> torch.Tensor:
    """A cached all-True ``[B, Tq]`` row mask (no allocation per call)."""
    key = (B, Tq, str(device))
    rows = _ROWS.get(key)
    if rows is None:
        if len(_ROWS) > 64:
            _ROWS.clear()
        rows = _ROWS[key] = torch.ones(B, Tq, dtype=torch.bool, device=device)
    return rows
