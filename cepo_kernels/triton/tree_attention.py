"""Triton tree attention: FlashAttention-style forward (with log-sum-exp) and backward over a
segment tree, grouped-query attention, fp16/bf16/fp32 inputs with fp32 accumulation.

Which blocks run: :meth:`TreeLayout.block_lists` turns the segment table into, for each query
block, the list of key blocks that hold an ancestor segment's tokens or the own segment's earlier
tokens (and the transpose for the dK/dV pass). Inside a visited block the exact token mask is
recomputed from the per-token tables ``seg``, ``depth`` and ``anc`` (see
``cepo_kernels/reference/tree_attention.py``), except in blocks flagged full (every query of the
block sees every key: an ancestor segment, or an earlier part of the own segment), where the mask
is skipped. No dense mask is ever built.

Forward, per query row ``i`` (log2 domain inside the kernel, ``c = scale * log2(e)``)::

    t_ij = c * q_i . k_j  (masked: -inf),  m_i = max_j t_ij,  l_i = sum_j 2^(t_ij - m_i)
    o_i = sum_j 2^(t_ij - m_i) v_j / l_i,  lse_i = ln(2) * (m_i + log2 l_i)

Backward, with ``p_ij = exp(scale q_i.k_j - lse_i)`` and upstream ``dO``, ``dlse``::

    dV_j = sum_i p_ij dO_i
    dP_ij = dO_i . v_j,  Delta_i = dO_i . o_i - dlse_i,  dS_ij = p_ij (dP_ij - Delta_i)
    dQ_i = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i

(``dlse`` enters through ``d lse_i / d s_ij = p_ij``.) dK/dV of a key head sum over the query
heads of its group and over every query block that visits it, so a prompt's dK/dV collects the
gradient of all segments below it; each program owns one key block of one key head, so no atomics.
Offsets of the (batch, head) bases are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cepo_kernels import configs
from cepo_kernels._dispatch import triton_interpreting
from cepo_kernels.reference.tree_attention import MAX_DEPTH, TreeLayout
from cepo_kernels.triton._launch import dot_meta
from cepo_kernels.triton._online_softmax import LOG2E

assert MAX_DEPTH == 4, "the kernels test exactly four ancestor levels (anc0..anc3)"


MAX_HEAD_DIM = 128  # head dim 256 would need > 255 registers per thread at these tiles


def launch_config(kind: str, head_dim: int) -> tuple[int, int, dict]:
    """``(BLOCK_M, BLOCK_N, {num_warps, num_stages})`` of ``kind`` ("fwd" or "bwd") for a head
    dim, from the active kernel configuration (``cepo_kernels/configs.py``; v1: 64 x 64 at every
    head dim). Under the interpreter the tiles are a quarter of the GPU's (at least 16), so the
    CPU tests still see the configuration's shape (e.g. v2's 128 x 64 forward as 32 x 16)."""
    table = configs.get("tree_attention")[kind]
    key = 64 if head_dim <= 64 else 128
    bm, bn, warps, stages = table[key]
    if triton_interpreting():
        bm, bn = max(16, bm // 4), max(16, bn // 4)
    return bm, bn, {"num_warps": warps, "num_stages": stages}


@triton.jit
def _tree_attn_bwd_delta_kernel(
    # pointers
    o_ptr,  # (B, H, T, D) forward output, unit stride on D
    do_ptr,  # (B, H, T, D) upstream gradient of the output, unit stride on D
    dlse_ptr,  # (B, H, T) fp32 upstream gradient of lse, contiguous (unused unless HAS_DLSE)
    delta_ptr,  # (B, H, T) fp32 out: rowsum(dO * O) - dlse
    # sizes
    T,
    H,
    D,
    # strides (elements)
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    # meta
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Delta of the backward in one small pass (fp32 accumulation) instead of three torch ops."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=msk,
                other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=msk,
                 other=0.0).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + bh * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(delta_ptr + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(offs_m, offs_n, seg_q, a0, a1, a2, a3, seg_k, depth_k):
    """``(BM, BN)`` bool: query ``offs_m`` sees key ``offs_n`` (see the module docstring)."""
    sk = seg_k[None, :]
    dk = depth_k[None, :]
    vis = (dk == 0) & (a0[:, None] == sk)
    vis |= (dk == 1) & (a1[:, None] == sk)
    vis |= (dk == 2) & (a2[:, None] == sk)
    vis |= (dk == 3) & (a3[:, None] == sk)
    vis &= sk >= 0
    vis &= (sk != seg_q[:, None]) | (offs_n[None, :] <= offs_m[:, None])
    return vis


@triton.jit
def _load_query_meta(seg_ptr, anc_ptr, b, offs_m, T, stride_anc_b, stride_anc_d):
    """Segment and the four ancestor ids of the query tokens ``offs_m`` (``-1`` past ``T``)."""
    mm = offs_m < T
    seg_q = tl.load(seg_ptr + b * T + offs_m, mask=mm, other=-1)
    base = anc_ptr + b * stride_anc_b + offs_m
    a0 = tl.load(base, mask=mm, other=-1)
    a1 = tl.load(base + stride_anc_d, mask=mm, other=-1)
    a2 = tl.load(base + 2 * stride_anc_d, mask=mm, other=-1)
    a3 = tl.load(base + 3 * stride_anc_d, mask=mm, other=-1)
    return seg_q, a0, a1, a2, a3


@triton.jit
def _tree_attn_fwd_kernel(
    # pointers
    q_ptr,  # (B, H, T, D) queries
    k_ptr,  # (B, H_kv, T, D) keys
    v_ptr,  # (B, H_kv, T, D) values
    o_ptr,  # (B, H, T, D) output, q's dtype
    lse_ptr,  # (B, H, T) fp32 log-sum-exp (natural log), contiguous
    seg_ptr,  # (B, T) int32 segment of each token, -1 padding
    depth_ptr,  # (B, T) int32 depth of the token's segment
    anc_ptr,  # (B, 4, T) int32 ancestor segment per depth
    blk_idx_ptr,  # (B, NQ, MAXK) int32 key blocks visited by each query block
    blk_full_ptr,  # (B, NQ, MAXK) int32 1: every pair in the block is visible (mask skipped)
    blk_cnt_ptr,  # (B, NQ) int32 how many
    # sizes
    T,
    H,
    GROUP,  # H / H_kv
    D,
    NQ,
    MAXK,
    scale_log2,  # scale * log2(e)
    # strides (elements)
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_anc_b,
    stride_anc_d,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee": full fp32 products for fp32 inputs (ignored for 16-bit)
    UPCAST: tl.constexpr,  # True: cast dot operands to fp32 (bf16 under the interpreter, whose bf16 dot is wrong)
):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < T
    md = offs_d < D
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=mm[:, None] & md[None, :],
        other=0.0,
    )
    seg_q, a0, a1, a2, a3 = _load_query_meta(seg_ptr, anc_ptr, b, offs_m, T, stride_anc_b, stride_anc_d)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    n_blk = tl.load(blk_cnt_ptr + b * NQ + qb)
    for j in range(0, n_blk):
        kb = tl.load(blk_idx_ptr + (b * NQ + qb) * MAXK + j)
        full = tl.load(blk_full_ptr + (b * NQ + qb) * MAXK + j)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale_log2
        if full == 0:
            seg_k = tl.load(seg_ptr + b * T + offs_n, mask=mn, other=-1)
            depth_k = tl.load(depth_ptr + b * T + offs_n, mask=mn, other=0)
            vis = _visible(offs_m, offs_n, seg_q, a0, a1, a2, a3, seg_k, depth_k)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(seen, (shift + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=mm[:, None] & md[None, :],
    )
    tl.store(lse_ptr + bh * T + offs_m, lse, mask=mm)


@triton.jit
def _tree_attn_bwd_dkdv_kernel(
    # pointers
    q_ptr,  # (B, H, T, D)
    k_ptr,  # (B, H_kv, T, D)
    v_ptr,  # (B, H_kv, T, D)
    do_ptr,  # (B, H, T, D) upstream gradient of the output, contiguous like q
    lse_ptr,  # (B, H, T) fp32
    delta_ptr,  # (B, H, T) fp32: rowsum(dO * O) - dlse
    dk_ptr,  # (B, H_kv, T, D) contiguous, k's dtype
    dv_ptr,  # (B, H_kv, T, D) contiguous, v's dtype
    seg_ptr,
    depth_ptr,
    anc_ptr,
    blk_idx_ptr,  # (B, NK, MAXQ) int32 query blocks that visit each key block
    blk_full_ptr,  # (B, NK, MAXQ) int32 1: every pair visible
    blk_cnt_ptr,  # (B, NK) int32
    # sizes
    T,
    H,
    HK,
    GROUP,
    D,
    NK,
    MAXQ,
    scale,
    # strides
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_anc_b,
    stride_anc_d,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kb = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HK
    hk = bhk % HK
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mn = offs_n < T
    md = offs_d < D
    k = tl.load(
        k_ptr + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=mn[:, None] & md[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=mn[:, None] & md[None, :],
        other=0.0,
    )
    seg_k = tl.load(seg_ptr + b * T + offs_n, mask=mn, other=-1)
    depth_k = tl.load(depth_ptr + b * T + offs_n, mask=mn, other=0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    n_blk = tl.load(blk_cnt_ptr + b * NK + kb)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        for i in range(0, n_blk):
            qb = tl.load(blk_idx_ptr + (b * NK + kb) * MAXQ + i)
            full = tl.load(blk_full_ptr + (b * NK + kb) * MAXQ + i)
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            mm = offs_m < T
            q = tl.load(
                q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0
            )
            do = tl.load(
                do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mm[:, None] & md[None, :], other=0.0
            )
            lse = tl.load(lse_ptr + (b * H + h) * T + offs_m, mask=mm, other=float("-inf"))
            delta = tl.load(delta_ptr + (b * H + h) * T + offs_m, mask=mm, other=0.0)
            s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale
            lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
            p = tl.exp(s - lse_safe[:, None])  # (BM, BN)
            if full == 0:
                seg_q, a0, a1, a2, a3 = _load_query_meta(seg_ptr, anc_ptr, b, offs_m, T, stride_anc_b, stride_anc_d)
                vis = _visible(offs_m, offs_n, seg_q, a0, a1, a2, a3, seg_k, depth_k)
                p = tl.where(vis, p, 0.0)
            dv += _mm(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
            dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    out_off = bhk * T * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mn[:, None] & md[None, :])
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=mn[:, None] & md[None, :])


@triton.jit
def _tree_attn_bwd_dq_kernel(
    # pointers
    q_ptr,  # (B, H, T, D)
    k_ptr,  # (B, H_kv, T, D)
    v_ptr,  # (B, H_kv, T, D)
    do_ptr,  # (B, H, T, D)
    lse_ptr,  # (B, H, T) fp32
    delta_ptr,  # (B, H, T) fp32
    dq_ptr,  # (B, H, T, D) contiguous, q's dtype
    seg_ptr,
    depth_ptr,
    anc_ptr,
    blk_idx_ptr,  # (B, NQ, MAXK) int32
    blk_full_ptr,  # (B, NQ, MAXK) int32
    blk_cnt_ptr,  # (B, NQ) int32
    # sizes
    T,
    H,
    GROUP,
    D,
    NQ,
    MAXK,
    scale,
    # strides
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_anc_b,
    stride_anc_d,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < T
    md = offs_d < D
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=mm[:, None] & md[None, :],
        other=0.0,
    )
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=mm[:, None] & md[None, :],
        other=0.0,
    )
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=mm, other=float("-inf"))
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=mm, other=0.0)
    seg_q, a0, a1, a2, a3 = _load_query_meta(seg_ptr, anc_ptr, b, offs_m, T, stride_anc_b, stride_anc_d)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    n_blk = tl.load(blk_cnt_ptr + b * NQ + qb)
    for j in range(0, n_blk):
        kb = tl.load(blk_idx_ptr + (b * NQ + qb) * MAXK + j)
        full = tl.load(blk_full_ptr + (b * NQ + qb) * MAXK + j)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = offs_n < T
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=mn[:, None] & md[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale
        p = tl.exp(s - lse_safe[:, None])
        if full == 0:
            seg_k = tl.load(seg_ptr + b * T + offs_n, mask=mn, other=-1)
            depth_k = tl.load(depth_ptr + b * T + offs_n, mask=mn, other=0)
            vis = _visible(offs_m, offs_n, seg_q, a0, a1, a2, a3, seg_k, depth_k)
            p = tl.where(vis, p, 0.0)
        dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
    tl.store(
        dq_ptr + bh * T * D + offs_m[:, None] * D + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=mm[:, None] & md[None, :],
    )


def _check_head_dim(D: int) -> None:
    if D > MAX_HEAD_DIM:
        raise ValueError(
            f"q: head dim {D} > {MAX_HEAD_DIM} is not supported by the triton tree-attention kernels "
            "(the tiles would need more than 255 registers per thread); use backend='torch'"
        )


def _check_last_stride(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride on the head dimension (the kernels assume it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def tree_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TreeLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Shapes as the reference; returns ``(out (B,H,T,D) q.dtype, lse (B,H,T) fp32)``."""
    q, k, v = (_check_last_stride(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    batch, heads, T, D = q.shape
    group = heads // k.shape[1]
    _check_head_dim(D)
    block_m, block_n, options = launch_config("fwd", D)
    q2k_idx, q2k_cnt, q2k_full, _, _, _ = layout.block_lists(block_m, block_n)
    nq = q2k_cnt.shape[1]
    out = torch.empty(batch, heads, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, T, dtype=torch.float32, device=q.device)
    if T == 0 or batch * heads == 0:
        return out, lse
    grid = (nq, batch * heads)
    _tree_attn_fwd_kernel[grid](
        q, k, v, out, lse, layout.seg, layout.depth, layout.anc, q2k_idx, q2k_full, q2k_cnt,
        T, heads, group, D, nq, q2k_idx.shape[2], scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        layout.anc.stride(0), layout.anc.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)),
        **dot_meta(q.dtype), **options,
    )  # fmt: skip
    return out, lse


def tree_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    layout: TreeLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns ``(dq, dk, dv)`` in the inputs' dtypes, contiguous."""
    q, k, v = (_check_last_stride(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    batch, heads, T, D = q.shape
    hk = k.shape[1]
    group = heads // hk
    _check_head_dim(D)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = _check_last_stride("grad_out", grad_out)
    out = _check_last_stride("out", out)
    block_d = max(16, triton.next_power_of_2(D))
    if not configs.get("tree_attention")["delta_kernel"] or T == 0 or batch * heads == 0:
        delta = (grad_out.float() * out.float()).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.float()
        delta = delta.contiguous()
    else:  # v2: one small kernel
        delta = torch.empty(batch, heads, T, dtype=torch.float32, device=q.device)
        dlse = grad_lse.float().contiguous() if grad_lse is not None else delta
        _tree_attn_bwd_delta_kernel[(triton.cdiv(T, 64), batch * heads)](
            out, grad_out, dlse, delta, T, heads, D,
            out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            HAS_DLSE=grad_lse is not None, BLOCK_M=64, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    lse = lse.contiguous()
    block_m, block_n, options = launch_config("bwd", D)
    q2k_idx, q2k_cnt, q2k_full, k2q_idx, k2q_cnt, k2q_full = layout.block_lists(block_m, block_n)
    nq, nk = q2k_cnt.shape[1], k2q_cnt.shape[1]
    # every element is written by the kernels below (rows that see nothing get zeros)
    dq = torch.empty(batch, heads, T, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(batch, hk, T, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(batch, hk, T, D, dtype=v.dtype, device=v.device)
    if T == 0 or batch * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        layout.anc.stride(0), layout.anc.stride(1),
    )  # fmt: skip
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **dot_meta(q.dtype))
    _tree_attn_bwd_dkdv_kernel[(nk, batch * hk)](
        q, k, v, grad_out, lse, delta, dk, dv, layout.seg, layout.depth, layout.anc, k2q_idx, k2q_full, k2q_cnt,
        T, heads, hk, group, D, nk, k2q_idx.shape[2], scale, *common_strides, **meta, **options,
    )  # fmt: skip
    _tree_attn_bwd_dq_kernel[(nq, batch * heads)](
        q, k, v, grad_out, lse, delta, dq, layout.seg, layout.depth, layout.anc, q2k_idx, q2k_full, q2k_cnt,
        T, heads, group, D, nq, q2k_idx.shape[2], scale, *common_strides, **meta, **options,
    )  # fmt: skip
    return dq, dk, dv


__all__ = ["tree_attention_bwd", "tree_attention_fwd"]
