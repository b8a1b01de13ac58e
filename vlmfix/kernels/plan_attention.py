"""Attention that executes a per-layer attention plan, flash-style, in Triton.

The plan's parts, in the order they apply (DESIGN.md §5):

1. visibility: key ``j`` is visible to query row ``i`` iff ``labels[b, j] != PAD`` and
   ``k_pos[b, j] <= q_pos[b, i]`` (positions, not indices, so left padding and pruned
   layers need nothing special); a row that sees no key outputs zeros;
2. pre-softmax edit (PAI / PAINT): in rows ``pre_rows[b, i]``, ``z = q·k·scale`` becomes
   ``z + pre_coef[b, h, j] * |z|``;
3. post-softmax reweighting (VAR, Kang et al., "See What You Are Told", ICLR 2025): with segment masses
   ``P_sink`` (IMAGE_SINK), ``P_rest`` (IMAGE) and ``P_img = P_sink + P_rest`` of the
   edited distribution, a row in ``rows`` is *selected* iff ``P_img >= min_mass``,
   ``0 < P_sink <= rho * P_img`` and ``P_rest > 0``; a selected row keeps the fraction ``p``
   of its sink mass and gives the rest to the non-sink image keys:
   ``O' = (A_text + p * A_sink + (1 + (1 - p) * P_sink / P_rest) * A_rest) / L``;
4. per-head output scale (VHR): ``out *= head_scale[b, h]``.

Two paths execute the plan. Prefill: a small kernel finds, per query tile, the key tiles
that every row sees in full and the last tile any row may see; the main kernel runs an
online softmax over key tiles, without masks on the full ones; with reweighting it sweeps
the keys twice (first the row max and segment sums, then the reweighted output), so one
accumulator suffices. Decode (``Tq <= DECODE_MAX_Q``): split-KV; each program handles the
query rows of the query heads of one KV head over one slice of the keys and writes partial
``(m, l_s, A_s)``; a second kernel merges the slices with log-sum-exp rescaling. Launch
grids depend on shapes only (no host sync), so both paths can be captured in CUDA graphs.
The Triton code lives in ``_plan_attention_kernels`` and is imported on first use:
importing this module does not import Triton.

``plan_attention_reference`` beside it computes the same thing densely in fp32.
"""

from __future__ import annotations

import torch

from vlmfix.errors import ConfigError
from vlmfix.kernels import _common as C
from vlmfix.kernels import dispatch

__all__ = ["plan_attention", "plan_attention_reference", "DECODE_MAX_Q"]

# Query lengths up to this take the split-KV decode path (decode, speculative drafts).
DECODE_MAX_Q = 8

_PATHS = ("auto", "prefill", "decode")


def _validate(q, k, v, labels, q_pos, k_pos, scale, pre_rows, pre_coef, reweight, head_scale):
    """Every check raises ConfigError naming the argument (messages are built only on failure:
    this runs per attention call)."""
    C.check_qkv(q, k, v, q_rank=4)
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    dev = q.device
    C.check_tensor("labels", labels, (b, tk), (torch.int8,), dev)
    C.check_tensor("q_pos", q_pos, (b, tq), C.INT_DTYPES, dev)
    C.check_tensor("k_pos", k_pos, (b, tk), C.INT_DTYPES, dev)
    C.check_scale(scale)
    if (pre_rows is None) != (pre_coef is None):
        raise ConfigError("pre_rows and pre_coef must be given together (or neither)")
    if pre_rows is not None:
        C.check_tensor("pre_rows", pre_rows, (b, tq), (torch.bool,), dev)
        C.check_tensor("pre_coef", pre_coef, (b, h, tk), (torch.float32,), dev)
    if reweight is not None:
        if not (isinstance(reweight, (tuple, list)) and len(reweight) == 4):
            raise ConfigError(f"reweight must be a tuple (rows, p, rho, min_mass), got {type(reweight).__name__}")
        rows, p, rho, min_mass = reweight
        C.check_tensor("reweight rows", rows, (b, tq), (torch.bool,), dev)
        for name, val in (("p", p), ("rho", rho), ("min_mass", min_mass)):
            if not isinstance(val, (int, float)) or isinstance(val, bool):
                raise ConfigError(f"reweight {name} must be a Python float, got {val!r}")
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"reweight p (fraction of sink mass kept) must be in [0, 1], got {p}")
    if head_scale is not None:
        C.check_tensor("head_scale", head_scale, (b, h), (torch.float32,), dev)


def plan_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    labels: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    pre_rows: torch.Tensor | None = None,
    pre_coef: torch.Tensor | None = None,
    reweight: tuple[torch.Tensor, float, float, float] | None = None,
    head_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with an attention plan's edits, in Triton (CUDA, or the CPU interpreter).

    Args:
        q: ``[B, H, Tq, D]``, float16 / bfloat16 (float32 accepted, for interpreter tests);
            D in {64, 80, 96, 128}. Any strides except the last dim's.
        k, v: ``[B, Hkv, Tk, D]``, q's dtype; ``H % Hkv == 0`` (grouped-query attention).
        labels: int8 ``[B, Tk]`` segment per key: TEXT=0, TEXT_SINK=1, IMAGE=2,
            IMAGE_SINK=3, PAD=4.
        q_pos: int32/int64 ``[B, Tq]`` position of each query row.
        k_pos: int32/int64 ``[B, Tk]`` position of each key; key j is visible to row i iff
            ``labels[b, j] != PAD and k_pos[b, j] <= q_pos[b, i]``.
        scale: score scale, usually ``D ** -0.5``.
        pre_rows: bool ``[B, Tq]`` rows whose scores get the pre-softmax edit.
        pre_coef: float32 ``[B, H, Tk]``; in ``pre_rows``, ``z -> z + pre_coef * |z|``.
        reweight: ``(rows, p, rho, min_mass)``: rows bool ``[B, Tq]`` and three floats;
            VAR's post-softmax reweighting (see the module docstring).
        head_scale: float32 ``[B, H]`` multiplies every row's output of each head.

    Returns:
        ``(out, selected)``: out ``[B, H, Tq, D]`` in q's dtype (fp32 accumulation);
        selected bool ``[B, H, Tq]`` rows that were reweighted, or None without ``reweight``.

    Example:
        >>> out, _ = plan_attention(q, k, v, labels=labels, q_pos=pos, k_pos=pos,
        ...                         scale=q.shape[-1] ** -0.5)  # doctest: +SKIP
    """
    return _plan_attention(
        q,
        k,
        v,
        labels=labels,
        q_pos=q_pos,
        k_pos=k_pos,
        scale=scale,
        pre_rows=pre_rows,
        pre_coef=pre_coef,
        reweight=reweight,
        head_scale=head_scale,
    )


def _plan_attention(
    q,
    k,
    v,
    *,
    labels,
    q_pos,
    k_pos,
    scale,
    pre_rows=None,
    pre_coef=None,
    reweight=None,
    head_scale=None,
    path: str = "auto",
    num_splits: int = 0,
):
    """``plan_attention`` with testing knobs: ``path`` forces the prefill or decode kernel,
    ``num_splits`` (> 0) forces the number of key slices of the decode kernel."""
    _validate(q, k, v, labels, q_pos, k_pos, scale, pre_rows, pre_coef, reweight, head_scale)
    if path not in _PATHS:
        raise ConfigError(f"path must be one of {_PATHS}, got {path!r}")
    if not torch.compiler.is_compiling():  # the op checks again when it runs
        dispatch.require(q.device)
    q, k, v = (C.last_dim_contiguous(x) for x in (q, k, v))
    rw_rows, rw_p, rw_rho, rw_min = (None, 1.0, 1.0, 0.0) if reweight is None else reweight
    out, selected = torch.ops.vlmfix.plan_attention(
        q,
        k,
        v,
        labels,
        q_pos,
        k_pos,
        float(scale),
        pre_rows,
        pre_coef,
        rw_rows,
        float(rw_p),
        float(rw_rho),
        float(rw_min),
        head_scale,
        path,
        int(num_splits),
    )
    return out, (selected if reweight is not None else None)


@torch.library.custom_op("vlmfix::plan_attention", mutates_args=())
def _plan_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    labels: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    pre_rows: torch.Tensor | None,
    pre_coef: torch.Tensor | None,
    rw_rows: torch.Tensor | None,
    rw_p: float,
    rw_rho: float,
    rw_min_mass: float,
    head_scale: torch.Tensor | None,
    path: str,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op behind :func:`plan_attention` (no input checks: call that). Returns ``(out,
    selected)``; selected is bool ``[B, H, Tq]`` with ``rw_rows``, else an empty ``[0]``."""
    from vlmfix.kernels import _plan_attention_kernels as K

    return K.launch(
        q,
        k,
        v,
        labels,
        q_pos,
        k_pos,
        scale,
        pre_rows,
        pre_coef,
        rw_rows,
        rw_p,
        rw_rho,
        rw_min_mass,
        head_scale,
        path=path,
        num_splits=num_splits,
        decode_max_q=DECODE_MAX_Q,
    )


@_plan_attention_op.register_fake
def _(
    q,
    k,
    v,
    labels,
    q_pos,
    k_pos,
    scale,
    pre_rows,
    pre_coef,
    rw_rows,
    rw_p,
    rw_rho,
    rw_min_mass,
    head_scale,
    path,
    num_splits,
):
    b, h, tq, _ = q.shape
    selected = q.new_empty((b, h, tq) if rw_rows is not None else (0,), dtype=torch.bool)
    return torch.empty_like(q, memory_format=torch.contiguous_format), selected


def plan_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    labels: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    pre_rows: torch.Tensor | None = None,
    pre_coef: torch.Tensor | None = None,
    reweight: tuple[torch.Tensor, float, float, float] | None = None,
    head_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense fp32 pure-torch ``plan_attention`` (same arguments and returns); materialises
    ``[B, H, Tq, Tk]``, so it is for tests and small inputs."""
    _validate(q, k, v, labels, q_pos, k_pos, scale, pre_rows, pre_coef, reweight, head_scale)
    n_rep = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(n_rep, dim=1)
    vf = v.float().repeat_interleave(n_rep, dim=1)
    z = torch.einsum("bhid,bhjd->bhij", q.float(), kf) * scale
    if pre_rows is not None:
        edited = z + pre_coef[:, :, None, :] * z.abs()
        z = torch.where(pre_rows[:, None, :, None], edited, z)
    lab = labels[:, None, None, :]
    visible = (lab != C.PAD) & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    z = z.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(z, dim=-1).nan_to_num(0.0)  # rows that see nothing: all zeros
    selected = None
    if reweight is not None:
        rows, p, rho, min_mass = reweight
        is_sink, is_rest = lab == C.IMAGE_SINK, lab == C.IMAGE
        p_sink = (probs * is_sink).sum(-1)
        p_rest = (probs * is_rest).sum(-1)
        p_img = p_sink + p_rest
        selected = rows[:, None, :] & (p_img >= min_mass) & (p_sink > 0) & (p_sink <= rho * p_img) & (p_rest > 0)
        c_rest = 1.0 + (1.0 - p) * p_sink / torch.where(p_rest > 0, p_rest, 1.0)
        weight = torch.where(is_sink, p, torch.where(is_rest, c_rest[..., None], 1.0))
        probs = torch.where(selected[..., None], probs * weight, probs)
    out = probs @ vf
    if head_scale is not None:
        out = out * head_scale[:, :, None, None]
    return out.to(q.dtype), selected
