"""Triton kernel and launcher of :mod:`vlmfix.kernels.row_stats` (imported on first use).

One program per (sample, KV head) holds the query rows of all its query heads (padded to at
least 16 rows for ``tl.dot``). The first sweep over the keys computes the base-2 scores,
writes them into the output buffer, and keeps the running max and sum of all visible keys
and, with their own running max, the sum and weighted values of the text keys. The second
sweep reads the scores back and normalises them: the scores are 4 bytes per key and head,
much less than re-reading K (2·D bytes per key and KV head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmfix.kernels import dispatch
from vlmfix.kernels._plan_attention_kernels import _M_INIT, LOG2E, PAD, TEXT_SINK, _live_end


@triton.jit
def _last_row_kernel(
    Q, K, V, Probs, OutNoImg, Labels, KPos, QPos,
    qk_scale,
    sqb, sqh, skb, skh, skt, svb, svh, svt, spb, sph, sob, soh,
    slb, skpb,
    HKV, N_REP, Tk, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    hk = pid % HKV
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < N_REP
    h = hk * N_REP + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = tl.load(QPos + b).to(tl.int32)
    n_end = _live_end(Labels, b * slb, KPos, b * skpb, 0, Tk, qpos, 1024)
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    p_rows = Probs + b * spb + h[:, None] * sph

    m_i = tl.full([BLOCK_R], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_t = tl.full([BLOCK_R], _M_INIT, dtype=tl.float32)
    l_t = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        lab = tl.load(Labels + b * slb + offs_n, mask=n_ok, other=PAD)
        kpos = tl.load(KPos + b * skpb + offs_n, mask=n_ok, other=0).to(tl.int32)
        vis = ((lab != PAD) & (kpos <= qpos))[None, :]
        kt = tl.load(K + k_base + offs_n[None, :] * skt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)  # fmt: skip
        z = tl.where(vis, tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale, float("-inf"))
        tl.store(p_rows + offs_n[None, :], z, mask=r_ok[:, None] & vis)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        m_i = m_new
        zt = tl.where((lab <= TEXT_SINK)[None, :], z, float("-inf"))
        mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
        alpha = tl.exp2(m_t - mt_new)
        pt = tl.exp2(zt - mt_new[:, None])
        l_t = l_t * alpha + tl.sum(pt, axis=1)
        vt = tl.load(V + v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                     other=0.0)  # fmt: skip
        acc_t = acc_t * alpha[:, None] + tl.dot(pt.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_t = mt_new
    out = acc_t / tl.where(l_t > 0, l_t, 1.0)[:, None]
    tl.store(OutNoImg + b * sob + h[:, None] * soh + offs_d[None, :], out.to(OutNoImg.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip

    # The scores written above are read back by other threads of this program.
    tl.debug_barrier()
    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        lab = tl.load(Labels + b * slb + offs_n, mask=n_ok, other=PAD)
        kpos = tl.load(KPos + b * skpb + offs_n, mask=n_ok, other=0).to(tl.int32)
        vis = r_ok[:, None] & ((lab != PAD) & (kpos <= qpos))[None, :]
        z = tl.load(p_rows + offs_n[None, :], mask=vis, other=float("-inf"))
        p = tl.where(vis, tl.exp2(z - m_i[:, None]) * inv_l[:, None], 0.0)
        tl.store(p_rows + offs_n[None, :], p, mask=r_ok[:, None] & n_ok[None, :])


def plan_launches(q_row, k, v, labels, k_pos, q_pos_row, scale):
    """The outputs and the kernel launch that fills them: ``(probs, out, [(kernel, grid, args, meta)])``."""
    b, h, d = q_row.shape
    hkv, tk = k.shape[1], k.shape[2]
    n_rep = h // hkv
    q_pos_row = q_pos_row.contiguous()  # the kernel reads QPos[b]: e.g. positions[:, -1] is strided
    probs = torch.empty((b, h, tk), dtype=torch.float32, device=q_row.device)
    out = torch.empty((b, h, d), dtype=q_row.dtype, device=q_row.device)
    if b * h == 0:
        return probs, out, []
    interp = dispatch.interpreting()
    args = (
        q_row, k, v, probs, out, labels, k_pos, q_pos_row,
        scale * LOG2E,
        q_row.stride(0), q_row.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), probs.stride(0), probs.stride(1), out.stride(0), out.stride(1),
        labels.stride(0), k_pos.stride(0),
        hkv, n_rep, tk,
    )  # fmt: skip
    meta = dict(
        D=d,
        BLOCK_R=max(16, triton.next_power_of_2(n_rep)),
        BLOCK_N=64,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_PREC="ieee" if q_row.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=1 if interp else 2,
    )
    return probs, out, [(_last_row_kernel, (b * hkv,), args, meta)]


def launch(q_row, k, v, labels, k_pos, q_pos_row, scale):
    """Run :func:`plan_launches`' kernel; returns ``(probs, out_noimg)``."""
    dispatch.require(q_row.device)
    probs, out, launches = plan_launches(q_row, k, v, labels, k_pos, q_pos_row, scale)
    for kernel, grid, args, meta in launches:
        kernel[grid](*args, **meta)
    return probs, out


__all__ = ["launch", "plan_launches"]
