"""Triton kernels and launchers of :mod:`vlmfix.kernels.plan_attention` (imported on first use).

Scores are kept in base 2: ``z2 = q·k * scale * log2(e)``; the pre-softmax edit
``z + c|z|`` commutes with that positive factor, so it is applied to ``z2`` directly.
Rows start at a finite running max (``_M_INIT``) so that a tile with no visible key gives
``exp2(-inf - m) = 0`` instead of ``exp2(-inf + inf) = NaN``.

Block sizes are fixed, not autotuned (they were chosen without a GPU to tune on, checking
only that the sm_90 build does not spill registers, see tests/kernels/gpu_compile.py):
prefill tiles of 128 query rows x 64 keys with 8 warps and 3 pipeline stages, the usual
choice for flash attention on H100-class GPUs at D <= 128 (2 stages with reweighting, whose
two sweeps need more registers); 64 x 64 with 4 warps when 128-row tiles would give fewer
programs than twice the GPU's multiprocessors (short prompts), and under the interpreter. Decode tiles hold up to 64
query rows (32 with reweighting's three accumulators) of the query heads of one KV head,
padded to at least 16 rows for ``tl.dot``, against 64 keys; the number of key slices fills
the GPU about twice over.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vlmfix.kernels import dispatch

LOG2E = 1.4426950408889634
# Globals read inside kernels must be constexpr (Triton refuses others when compiling).
_M_INIT = tl.constexpr(-1.0e30)
TEXT_SINK = tl.constexpr(1)
IMAGE = tl.constexpr(2)
IMAGE_SINK = tl.constexpr(3)
PAD = tl.constexpr(4)


# fmt: off
@triton.jit
def _live_end(Labels, lab_base, KPos, kpos_base, lo, hi, qpos_max, CHUNK: tl.constexpr):
    """One past the last key in ``[lo, hi)`` that some row (position <= ``qpos_max``) may see;
    ``lo`` when there is none. Key loops stop there: with positions that grow along the cache
    (the usual case) this is the causal bound, and out-of-order keys stay correct because
    every tile is masked anyway. Reads 9 bytes per key, against 4·D for K and V."""
    end = lo
    for c in range(lo, hi, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        ok = offs < hi
        lab = tl.load(Labels + lab_base + offs, mask=ok, other=PAD)
        kpos = tl.load(KPos + kpos_base + offs, mask=ok, other=0)
        live = (lab != PAD) & (kpos <= qpos_max)
        end = tl.maximum(end, tl.max(tl.where(live, offs + 1, 0), axis=0))
    return end


@triton.jit
def _scores(q, K, k_base, offs_n, offs_d, skt, Tk, D, Labels, lab_base, KPos, kpos_base, qpos, pre_row, coef,
            qk_scale, HAS_PRE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Base-2 scores of one key tile, edited and masked, ``[rows, BLOCK_N]``, and the tile's labels."""
    n_ok = offs_n < Tk
    lab = tl.load(Labels + lab_base + offs_n, mask=n_ok, other=PAD)
    kpos = tl.load(KPos + kpos_base + offs_n, mask=n_ok, other=0).to(tl.int32)
    kt = tl.load(K + k_base + offs_n[None, :] * skt + offs_d[:, None], mask=n_ok[None, :] & (offs_d[:, None] < D),
                 other=0.0)
    z = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    if HAS_PRE:
        z = tl.where(pre_row[:, None], z + coef * tl.abs(z), z)
    vis = (lab != PAD)[None, :] & (kpos[None, :] <= qpos[:, None])
    z = tl.where(vis, z, float("-inf"))
    return z, lab


@triton.jit
def _var_coefs(rows_rw, l_t, l_s, l_r, rw_p, rw_rho, rw_min_mass):
    """VAR's selection and per-segment factors from the per-row segment sums."""
    L = l_t + l_s + l_r
    Ls = tl.where(L > 0, L, 1.0)
    p_sink = l_s / Ls
    p_rest = l_r / Ls
    p_img = p_sink + p_rest
    sel = rows_rw & (p_img >= rw_min_mass) & (p_sink > 0) & (p_sink <= rw_rho * p_img) & (p_rest > 0)
    c_sink = tl.where(sel, rw_p, 1.0)
    c_rest = tl.where(sel, 1.0 + (1.0 - rw_p) * p_sink / tl.where(p_rest > 0, p_rest, 1.0), 1.0)
    return sel, c_sink, c_rest, Ls


@triton.jit
def _prefill_ranges_kernel(
    Labels, QPos, KPos, Ranges, slb, sqpb, skpb, Tq, Tk, N_QTILES,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_T: tl.constexpr,
):
    """Per (sample, query tile), in key tiles of ``BLOCK_N``: ``n_end``, one past the last tile
    that some row may see, and ``[f_lo, f_hi)``, the first run of tiles that every row sees
    in full (no PAD key, every position <= the tile's smallest query position). The prefill
    kernel attends to that run without masks and masks only the rest. Positions that grow
    along the cache make ``n_end`` the causal bound; keys in any order stay correct."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Tq
    qpos = tl.load(QPos + b * sqpb + offs_m, mask=m_ok, other=0).to(tl.int32)
    q_max = tl.max(tl.where(m_ok, qpos, -1), axis=0)
    q_min = tl.min(tl.where(m_ok, qpos, 1 << 30), axis=0)
    n_tiles = tl.cdiv(Tk, BLOCK_N)
    n_end = n_tiles * 0
    f_lo = n_tiles * 0 + (1 << 30)
    f_hi = n_tiles * 0 + (1 << 30)
    for c in range(0, n_tiles, CHUNK_T):
        t = c + tl.arange(0, CHUNK_T)
        offs = t[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        ok = offs < Tk
        real = tl.load(Labels + b * slb + offs, mask=ok, other=PAD) != PAD
        kpos = tl.load(KPos + b * skpb + offs, mask=ok, other=0).to(tl.int32)
        live = tl.max((real & (kpos <= q_max)).to(tl.int32), axis=1) > 0
        full = tl.min((real & (kpos <= q_min)).to(tl.int32), axis=1) > 0
        n_end = tl.maximum(n_end, tl.max(tl.where(live, t + 1, 0), axis=0))
        f_lo = tl.minimum(f_lo, tl.min(tl.where(full, t, 1 << 30), axis=0))
        f_hi = tl.minimum(f_hi, tl.min(tl.where(~full & (t > f_lo), t, 1 << 30), axis=0))
    f_hi = tl.minimum(f_hi, n_end)
    f_lo = tl.minimum(f_lo, f_hi)
    base = Ranges + (b * N_QTILES + pid_m) * 3
    tl.store(base, f_lo)
    tl.store(base + 1, f_hi)
    tl.store(base + 2, n_end)


@triton.jit
def _sweep(
    q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
    lo, hi, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest,
    offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, HAS_PRE: tl.constexpr, HAS_RW: tl.constexpr, SECOND: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Keys ``[lo, hi)`` of one query tile. First sweep: online softmax state (with HAS_RW
    the per-segment sums only). SECOND (reweighting): accumulate ``c_seg * exp2(z - m)``
    with the final row max ``m_i``. MASKED=False for tiles every row sees in full: no
    visibility masks and no bounds checks."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Tk
        d_ok = offs_d < D
        if MASKED:
            lab = tl.load(Labels + lab_base + offs_n, mask=n_ok, other=PAD)
            kt = tl.load(K + k_base + offs_n[None, :] * skt + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
        elif D == BLOCK_D:  # a full tile of a power-of-two head dim: no masks at all
            lab = tl.load(Labels + lab_base + offs_n)
            kt = tl.load(K + k_base + offs_n[None, :] * skt + offs_d[:, None])
        else:
            lab = tl.load(Labels + lab_base + offs_n)
            kt = tl.load(K + k_base + offs_n[None, :] * skt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        z = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if HAS_PRE:
            coef = tl.load(coef_ptr + offs_n, mask=n_ok, other=0.0)
            z = tl.where(pre_row[:, None], z + coef[None, :] * tl.abs(z), z)
        if MASKED:
            kpos = tl.load(KPos + kpos_base + offs_n, mask=n_ok, other=0).to(tl.int32)
            z = tl.where((lab != PAD)[None, :] & (kpos[None, :] <= qpos[:, None]), z, float("-inf"))
        if MASKED:
            vt = tl.load(V + v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                         other=0.0)
        elif D == BLOCK_D:
            vt = tl.load(V + v_base + offs_n[:, None] * svt + offs_d[None, :])
        else:
            vt = tl.load(V + v_base + offs_n[:, None] * svt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        if SECOND:
            w = tl.where((lab == IMAGE_SINK)[None, :], c_sink[:, None],
                         tl.where((lab == IMAGE)[None, :], c_rest[:, None], 1.0))
            p = tl.exp2(z - m_i[:, None]) * w
            acc += tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        else:
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(z - m_new[:, None])
            if HAS_RW:
                is_s = (lab == IMAGE_SINK)[None, :]
                is_r = (lab == IMAGE)[None, :]
                l_s = l_s * alpha + tl.sum(tl.where(is_s, p, 0.0), axis=1)
                l_r = l_r * alpha + tl.sum(tl.where(is_r, p, 0.0), axis=1)
                l_t = l_t * alpha + tl.sum(tl.where(is_s | is_r, 0.0, p), axis=1)
            else:
                l_t = l_t * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
            m_i = m_new
    return m_i, l_t, l_s, l_r, acc


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Sel, Labels, QPos, KPos, PreRows, PreCoef, RwRows, HeadScale, Ranges,
    qk_scale, rw_p, rw_rho, rw_min_mass,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    slb, sqpb, skpb, sprb, spcb, spch, srwb, shsb, ssb, ssh,
    H, N_REP, Tq, Tk, N_QTILES, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_RW: tl.constexpr, HAS_HS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: ``BLOCK_M`` query rows of one (sample, head) against the keys they may see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B * H * T * D can pass 2**31
    h = pid_bh % H
    hk = h // N_REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < D
    ranges = Ranges + (b * N_QTILES + pid_m) * 3
    f_lo = tl.load(ranges) * BLOCK_N
    f_hi = tl.load(ranges + 1) * BLOCK_N
    n_end = tl.load(ranges + 2) * BLOCK_N
    qpos = tl.load(QPos + b * sqpb + offs_m, mask=m_ok, other=-1).to(tl.int32)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    if HAS_PRE:
        pre_row = tl.load(PreRows + b * sprb + offs_m, mask=m_ok, other=0) != 0
    else:
        pre_row = m_ok
    coef_ptr = PreCoef + b * spcb + h * spch
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh
    lab_base = b * slb
    kpos_base = b * skpb

    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_t = tl.zeros([BLOCK_M], dtype=tl.float32)  # every segment; with HAS_RW the text segments only
    l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    c_sink = l_s
    c_rest = l_s
    m_i, l_t, l_s, l_r, acc = _sweep(
        q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
        0, f_lo, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest, offs_d, D, BLOCK_N, BLOCK_D,
        True, HAS_PRE, HAS_RW, False, DOT_PREC)
    m_i, l_t, l_s, l_r, acc = _sweep(
        q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
        f_lo, f_hi, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest, offs_d, D, BLOCK_N, BLOCK_D,
        False, HAS_PRE, HAS_RW, False, DOT_PREC)
    m_i, l_t, l_s, l_r, acc = _sweep(
        q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
        f_hi, n_end, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest, offs_d, D, BLOCK_N, BLOCK_D,
        True, HAS_PRE, HAS_RW, False, DOT_PREC)

    if HAS_RW:
        # Second sweep: the row max and the segment sums are final, so every key's weight
        # c_seg * exp2(z - m) / L is known and one accumulator suffices.
        rows_rw = tl.load(RwRows + b * srwb + offs_m, mask=m_ok, other=0) != 0
        sel, c_sink, c_rest, Ls = _var_coefs(rows_rw, l_t, l_s, l_r, rw_p, rw_rho, rw_min_mass)
        tl.store(Sel + b * ssb + h * ssh + offs_m, sel.to(tl.uint8), mask=m_ok)
        m_i, l_t, l_s, l_r, acc = _sweep(
            q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
            0, f_lo, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest, offs_d, D, BLOCK_N, BLOCK_D,
            True, HAS_PRE, HAS_RW, True, DOT_PREC)
        m_i, l_t, l_s, l_r, acc = _sweep(
            q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
            f_lo, f_hi, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest, offs_d, D, BLOCK_N, BLOCK_D,
            False, HAS_PRE, HAS_RW, True, DOT_PREC)
        m_i, l_t, l_s, l_r, acc = _sweep(
            q, qpos, pre_row, K, V, k_base, v_base, skt, svt, Labels, lab_base, KPos, kpos_base, coef_ptr,
            f_hi, n_end, Tk, qk_scale, m_i, l_t, l_s, l_r, acc, c_sink, c_rest, offs_d, D, BLOCK_N, BLOCK_D,
            True, HAS_PRE, HAS_RW, True, DOT_PREC)
        out = acc / Ls[:, None]
    else:
        out = acc / tl.where(l_t > 0, l_t, 1.0)[:, None]
    if HAS_HS:
        out = out * tl.load(HeadScale + b * shsb + h)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_partial_kernel(
    Q, K, V, Mw, Lw, Aw, Labels, QPos, KPos, PreRows, PreCoef,
    qk_scale,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    slb, sqpb, skpb, sprb, spcb, spch,
    H, HKV, N_REP, Tq, Tk, S, BLOCKS_PER_SPLIT, D: tl.constexpr,
    NSEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PRE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program: up to ``BLOCK_R`` query rows of the query heads of one KV head (all of them
    unless that many rows would not fit in registers), over one key slice; writes the slice's
    running max and per-segment sums and weighted values."""
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    hk = pid_bg % HKV
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < N_REP * Tq
    h = hk * N_REP + offs_r // Tq
    i = offs_r % Tq
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    lab_base = b * slb
    kpos_base = b * skpb
    qpos = tl.load(QPos + b * sqpb + i, mask=r_ok, other=-1).to(tl.int32)
    lo = pid_s * BLOCKS_PER_SPLIT * BLOCK_N
    # No search for the last visible key here: at decode nearly every key is visible, and a
    # search would add a dependent round trip to memory before the first K/V load.
    hi = tl.minimum(lo + BLOCKS_PER_SPLIT * BLOCK_N, Tk)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqt + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_PRE:
        pre_row = tl.load(PreRows + b * sprb + i, mask=r_ok, other=0) != 0
    else:
        pre_row = r_ok
    k_base = b * skb + hk * skh
    v_base = b * svb + hk * svh

    m_i = tl.full([BLOCK_R], _M_INIT, dtype=tl.float32)
    l_t = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if HAS_PRE:
            coef = tl.load(PreCoef + b * spcb + h[:, None] * spch + offs_n[None, :],
                           mask=r_ok[:, None] & (offs_n[None, :] < Tk), other=0.0)
        else:
            coef = 0.0  # unused
        z, lab = _scores(q, K, k_base, offs_n, offs_d, skt, Tk, D, Labels, lab_base, KPos, kpos_base, qpos,
                         pre_row, coef, qk_scale, HAS_PRE, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        vt = tl.load(V + v_base + offs_n[:, None] * svt + offs_d[None, :],
                     mask=(offs_n[:, None] < Tk) & d_ok[None, :], other=0.0)
        if NSEG == 3:
            is_s = (lab == IMAGE_SINK)[None, :]
            is_r = (lab == IMAGE)[None, :]
            p_s = tl.where(is_s, p, 0.0)
            p_r = tl.where(is_r, p, 0.0)
            p_t = tl.where(is_s | is_r, 0.0, p)
            l_s = l_s * alpha + tl.sum(p_s, axis=1)
            l_r = l_r * alpha + tl.sum(p_r, axis=1)
            l_t = l_t * alpha + tl.sum(p_t, axis=1)
            acc_s = acc_s * alpha[:, None] + tl.dot(p_s.to(vt.dtype), vt, input_precision=DOT_PREC)
            acc_r = acc_r * alpha[:, None] + tl.dot(p_r.to(vt.dtype), vt, input_precision=DOT_PREC)
            acc_t = acc_t * alpha[:, None] + tl.dot(p_t.to(vt.dtype), vt, input_precision=DOT_PREC)
        else:
            l_t = l_t * alpha + tl.sum(p, axis=1)
            acc_t = acc_t * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new

    # Workspace rows are (b, h, i) flattened; partials are [row, split, segment, BLOCK_D].
    row = (b * H + h) * Tq + i
    ws = row * S + pid_s
    tl.store(Mw + ws, m_i, mask=r_ok)
    tl.store(Lw + ws * NSEG, l_t, mask=r_ok)
    tl.store(Aw + (ws * NSEG)[:, None] * BLOCK_D + offs_d[None, :], acc_t, mask=r_ok[:, None])
    if NSEG == 3:
        tl.store(Lw + ws * NSEG + 1, l_s, mask=r_ok)
        tl.store(Lw + ws * NSEG + 2, l_r, mask=r_ok)
        tl.store(Aw + (ws * NSEG + 1)[:, None] * BLOCK_D + offs_d[None, :], acc_s, mask=r_ok[:, None])
        tl.store(Aw + (ws * NSEG + 2)[:, None] * BLOCK_D + offs_d[None, :], acc_r, mask=r_ok[:, None])


@triton.jit
def _decode_merge_kernel(
    Mw, Lw, Aw, Out, Sel, RwRows, HeadScale,
    rw_p, rw_rho, rw_min_mass,
    sob, soh, sot, srwb, shsb, ssb, ssh,
    H, Tq, D, S,
    NSEG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_HS: tl.constexpr,
):
    """One program per (b, h, i): log-sum-exp merge of the key slices, then the plan's output."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (H * Tq)
    h = (row // Tq) % H
    i = row % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    ws = row * S + offs_s
    m = tl.load(Mw + ws, mask=s_ok, other=_M_INIT)
    w = tl.where(s_ok, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    l_t = tl.sum(w * tl.load(Lw + ws * NSEG, mask=s_ok, other=0.0), axis=0)
    a_t = tl.sum(w[:, None] * tl.load(Aw + (ws * NSEG)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None],
                                      other=0.0), axis=0)
    if NSEG == 3:
        l_s = tl.sum(w * tl.load(Lw + ws * NSEG + 1, mask=s_ok, other=0.0), axis=0)
        l_r = tl.sum(w * tl.load(Lw + ws * NSEG + 2, mask=s_ok, other=0.0), axis=0)
        a_s = tl.sum(w[:, None] * tl.load(Aw + (ws * NSEG + 1)[:, None] * BLOCK_D + offs_d[None, :],
                                          mask=s_ok[:, None], other=0.0), axis=0)
        a_r = tl.sum(w[:, None] * tl.load(Aw + (ws * NSEG + 2)[:, None] * BLOCK_D + offs_d[None, :],
                                          mask=s_ok[:, None], other=0.0), axis=0)
        rows_rw = tl.load(RwRows + b * srwb + i) != 0
        sel, c_sink, c_rest, Ls = _var_coefs(rows_rw, l_t, l_s, l_r, rw_p, rw_rho, rw_min_mass)
        tl.store(Sel + b * ssb + h * ssh + i, sel.to(tl.uint8))
        out = (a_t + c_sink * a_s + c_rest * a_r) / Ls
    else:
        out = a_t / tl.where(l_t > 0, l_t, 1.0)
    if HAS_HS:
        out = out * tl.load(HeadScale + b * shsb + h)
    tl.store(Out + b * sob + h * soh + i * sot + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
# fmt: on


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _u8(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Bool flags as uint8 for Triton (a view, no copy); a dummy pointer when absent."""
    return like if x is None else x.view(torch.uint8)


def _stride(x: torch.Tensor | None, dim: int) -> int:
    return 0 if x is None else x.stride(dim)


def num_decode_splits(batch: int, kv_heads: int, k_len: int, block_n: int, device: torch.device) -> int:
    """Key slices for the decode kernel: enough programs to fill the GPU about twice over,
    from shapes only (the same for every call of a given shape, so CUDA graphs can replay it)."""
    n_blocks = triton.cdiv(k_len, block_n)
    target = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    splits = max(1, min(n_blocks, triton.cdiv(target, batch * kv_heads)))
    per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, per_split)


# fmt: off
def plan_launches(q, k, v, labels, q_pos, k_pos, scale, pre_rows, pre_coef, rw_rows, rw_p, rw_rho, rw_min_mass,
                  head_scale, *, path: str, num_splits: int, decode_max_q: int):
    """The outputs and the kernel launches that fill them: ``(out, selected, [(kernel, grid, args, meta)])``.

    Separate from :func:`launch` so that a test can compile the very same launches for a GPU
    target without one (``tests/kernels/test_compile_for_gpu.py``)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    n_rep = h // hkv
    out = torch.empty((b, h, tq, d), dtype=q.dtype, device=q.device)
    has_pre, has_rw, has_hs = pre_rows is not None, rw_rows is not None, head_scale is not None
    # Without reweighting there is nothing to select: an empty tensor, and no memset launch.
    # With it, the kernels write every row.
    selected = torch.empty((b, h, tq) if has_rw else (0,), dtype=torch.bool, device=q.device)
    ssb, ssh = selected.stride()[:2] if has_rw else (0, 0)
    if b * h * tq == 0:
        return out, selected, []
    block_d = max(16, triton.next_power_of_2(d))
    qk_scale = scale * LOG2E
    dummy = labels  # stands for absent optional tensors; the kernels never read it then
    pre_u8, rw_u8, sel_u8 = _u8(pre_rows, dummy), _u8(rw_rows, dummy), selected.view(torch.uint8)
    pre_coef_t = dummy if pre_coef is None else pre_coef
    hs_t = dummy if head_scale is None else head_scale
    interp = dispatch.interpreting()
    # fp32 inputs (tests) get exact fp32 products; tf32 would cost them three digits.
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    use_decode = path == "decode" or (path == "auto" and tq <= decode_max_q)

    if not use_decode:
        block_m, block_n = (64, 64) if interp else (128, 64)
        if not interp and q.device.type == "cuda" and triton.cdiv(tq, 128) * b * h < 2 * _sm_count(q.device.index or 0):
            block_m = 64  # short prompts: 64-row tiles give the GPU twice as many programs (shapes only)
        n_qtiles = triton.cdiv(tq, block_m)
        ranges = torch.empty((b, n_qtiles, 3), dtype=torch.int32, device=q.device)
        ranges_args = (labels, q_pos, k_pos, ranges, labels.stride(0), q_pos.stride(0), k_pos.stride(0), tq, tk, n_qtiles)
        ranges_meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, CHUNK_T=16, num_warps=4)
        args = (
            q, k, v, out, sel_u8, labels, q_pos, k_pos, pre_u8, pre_coef_t, rw_u8, hs_t, ranges,
            qk_scale, rw_p, rw_rho, rw_min_mass,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            labels.stride(0), q_pos.stride(0), k_pos.stride(0), _stride(pre_rows, 0),
            _stride(pre_coef, 0), _stride(pre_coef, 1), _stride(rw_rows, 0), _stride(head_scale, 0),
            ssb, ssh,
            h, n_rep, tq, tk, n_qtiles,
        )
        meta = dict(
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_PRE=has_pre, HAS_RW=has_rw, HAS_HS=has_hs,
            DOT_PREC=dot_prec, num_warps=4 if block_m == 64 else 8, num_stages=1 if interp else (2 if has_rw else 3),
        )
        return out, selected, [
            (_prefill_ranges_kernel, (n_qtiles, b), ranges_args, ranges_meta),
            (_prefill_kernel, (n_qtiles, b * h), args, meta),
        ]

    block_n = 64
    n_blocks = max(1, triton.cdiv(tk, block_n))
    splits = num_splits if num_splits > 0 else num_decode_splits(b, hkv, tk, block_n, q.device)
    per_split = triton.cdiv(n_blocks, min(splits, n_blocks))
    splits = triton.cdiv(n_blocks, per_split)
    nseg = 3 if has_rw else 1
    rows = b * h * tq
    m_ws = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
    l_ws = torch.empty((rows, splits, nseg), dtype=torch.float32, device=q.device)
    a_ws = torch.empty((rows, splits, nseg, block_d), dtype=torch.float32, device=q.device)
    partial_args = (
        q, k, v, m_ws, l_ws, a_ws, labels, q_pos, k_pos, pre_u8, pre_coef_t,
        qk_scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        labels.stride(0), q_pos.stride(0), k_pos.stride(0), _stride(pre_rows, 0),
        _stride(pre_coef, 0), _stride(pre_coef, 1),
        h, hkv, n_rep, tq, tk, splits, per_split,
    )
    # Rows of one KV head's query heads share each K/V tile; with reweighting there are three
    # [BLOCK_R, BLOCK_D] fp32 accumulators, so at most 32 rows go in one program then.
    block_r = min(max(16, triton.next_power_of_2(n_rep * tq)), 32 if nseg == 3 else 64)
    row_chunks = triton.cdiv(n_rep * tq, block_r)
    partial_meta = dict(
        D=d, NSEG=nseg, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, HAS_PRE=has_pre, DOT_PREC=dot_prec,
        num_warps=8 if block_r * nseg >= 96 else 4, num_stages=1 if interp else 2,
    )
    merge_args = (
        m_ws, l_ws, a_ws, out, sel_u8, rw_u8, hs_t,
        rw_p, rw_rho, rw_min_mass,
        *out.stride()[:3], _stride(rw_rows, 0), _stride(head_scale, 0), ssb, ssh,
        h, tq, d, splits,
    )
    merge_meta = dict(
        NSEG=nseg, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, HAS_HS=has_hs,
        num_warps=4 if block_d >= 128 else 2,
    )
    return out, selected, [
        (_decode_partial_kernel, (splits, b * hkv, row_chunks), partial_args, partial_meta),
        (_decode_merge_kernel, (rows,), merge_args, merge_meta),
    ]
# fmt: on


def launch(*args, **kwargs):
    """Run :func:`plan_launches`' kernels; returns ``(out, selected)``."""
    dispatch.require(args[0].device)
    out, selected, launches = plan_launches(*args, **kwargs)
    for kernel, grid, kargs, meta in launches:
        kernel[grid](*kargs, **meta)
    return out, selected


__all__ = ["launch", "num_decode_splits", "plan_launches"]
