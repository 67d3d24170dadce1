"""Triton kernels for log-probs straight from hidden states and the LM-head weight
(``linear_token_logprobs``, ``linear_contrastive_logprobs``). Nothing of size ``N x V`` is
allocated in the forward; the backward holds one ``N x V_chunk`` block of logits gradients.

Forward (``_linear_lse_fwd_kernel``), grid ``(cdiv(N, BLOCK_N), cdiv(V, SPLIT_V))``: a program
owns ``BLOCK_N`` rows and one vocabulary split of ``SPLIT_V`` columns. For each ``BLOCK_N x
BLOCK_V`` logits tile of its split it runs a K-loop over ``D`` (``tl.dot`` of bf16/fp16/fp32
tiles into an fp32 accumulator), adds the bias, scales by ``1 / T``, sets columns past the
split (and so past ``V``) to ``-inf``, and folds the tile into an online log-sum-exp per row
(running max ``m`` from ``-inf``, ``s = sum exp(z - m)``, and for the entropy
``a = sum exp(z - m) (z - m)``). The target logit is taken from the same fp32 tile. The weight
tile of a K-step is loaded once and used for up to three hidden streams (``NUM_STREAMS``), so
the three CEPO contexts read the head weight once. Partial ``(m, s, a)`` per (row, split) go to
a small ``(NUM_STREAMS, n_splits, N)`` buffer; the split that holds a row's target writes its
target logit.

Combine (``_linear_logprobs_combine_kernel``, ``_linear_contrastive_combine_kernel``): one
program per ``BLOCK`` rows merges the splits in index order::

    m = max_j m_j,  s = sum_j s_j exp(m_j - m),  a = sum_j exp(m_j - m) (a_j + s_j (m_j - m))
    lse = m + log s,  H = log s - a / s,  logp = z_y - lse

and, for the contrastive op, applies the CEPO weighting (``contrastive_weight``) as its final
step. Ignored rows (``target == ignore_index``) get 0.

Backward, per vocabulary chunk ``[v_lo, v_hi)`` (``V_chunk`` columns, sized so the chunk's
``N x V_chunk`` gradient block fits ``G_BUDGET_BYTES``):

1. ``_linear_grad_logits_kernel`` recomputes each logits tile (same K-loop) and writes
   ``G = (g (onehot(y) - p) - e p (z - (lse - H))) / T`` with ``p = exp(z - lse)`` in the
   hidden dtype (0 for ignored rows and for columns past ``v_hi``).
2. ``_matmul_kernel``: ``dh_fp32 += G @ W[v_lo:v_hi]`` (each output tile owned by one program,
   read-add-write into an fp32 buffer) and ``dW[v_lo:v_hi] = G^T @ hidden`` (the full sum over
   ``N`` in one program's fp32 accumulator, rounded once to the weight dtype).
3. ``db[v_lo:v_hi] = G.sum(0)`` in fp32.

Determinism and batch invariance: no atomics anywhere; every reduction runs in a fixed order
inside one program or over splits/chunks in index order; tile sizes and ``SPLIT_V`` are fixed
constants (never derived from ``N``), so a row's log-prob depends only on that row, ``W``,
``b`` and ``T``: bit-identical for any ``N``, any neighbouring rows and any number of runs.

Offsets: row and vocabulary indices are widened to int64 before multiplying by a stride
(``V x D`` and ``N x V_chunk`` exceed 2^31 elements at real sizes).

The interpreter (``TRITON_INTERPRET=1``) cannot ``tl.dot`` bfloat16 (it multiplies the raw
bits), and its fp32 ``tl.dot`` is a CPU BLAS call whose rounding depends on a row's place in the
tile; there the tiles are multiplied in fp64 and rounded once to fp32 (``UPCAST``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cepo_kernels import configs
from cepo_kernels._dispatch import triton_interpreting
from cepo_kernels.triton._launch import dot_meta
from cepo_kernels.triton.contrastive_advantage import contrastive_weight

# Largest (N x V_chunk) block of logits gradients the backward keeps at once.
G_BUDGET_BYTES = 256 << 20


@dataclass(frozen=True)
class Config:
    """Tile sizes; fixed per device kind and dtype, never derived from N (batch invariance)."""

    block_n: int  # rows per tile
    block_v: int  # vocabulary columns per tile
    block_k: int  # hidden dims per K-step
    split_v: int  # vocabulary columns per forward program (multiple of block_v)
    mm_block: int  # square output tile of the backward matmuls
    mm_block_k: int  # K-step of the backward matmuls
    num_warps: int
    num_stages: int


def config(dtype: torch.dtype, *, interpreter: bool | None = None) -> Config:
    """Tiles for ``dtype`` on a GPU, or under the interpreter (default: whichever runs now)."""
    if triton_interpreting() if interpreter is None else interpreter:
        # small tiles keep the interpreter fast and still give several splits/tiles in tests
        return Config(16, 64, 64, 256, 64, 64, 4, 1)
    # H100 starting points, not yet tuned on hardware. Compiled for sm_90 offline (Triton 3.9):
    # 16-bit: 128 registers/thread for one stream, 255 and no spills for three streams, 72 KiB
    # shared memory (3 stages); fp32 (no tensor cores with exact fp32 products) uses 32-wide
    # K-steps: 128-166 registers for one stream, three streams spill 288 bytes.
    if dtype in (torch.bfloat16, torch.float16):
        return Config(64, 128, 64, 4096, 128, 64, 8, 3)
    return Config(64, 128, 32, 4096, 128, 32, 8, 2)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with an fp32 accumulator. ``UPCAST`` (the interpreter only): the product in
    fp64, rounded once to fp32, so that a row's result does not depend on its place in the tile
    (the interpreter's matmul is a CPU BLAS call, whose fp32 rounding does)."""
    if UPCAST:
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(acc, b_ptr, cols, col_ok, inv_temperature, HAS_BIAS: tl.constexpr):
    """fp32 ``(acc + b) / T`` with ``-inf`` in columns that do not exist."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temperature
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _online_update(m, s, a, z, COMPUTE_ENTROPY: tl.constexpr):
    """Fold a ``(BLOCK_N, BLOCK_V)`` tile ``z`` into per-row ``(m, s, a)``."""
    m_new = tl.maximum(m, tl.max(z, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    zs = z - shift[:, None]
    e = tl.exp(zs)
    if COMPUTE_ENTROPY:
        carried = tl.where(s > 0, scale * (a + s * (m - shift)), 0.0)
        a = carried + tl.sum(tl.where(e > 0, e * zs, 0.0), 1)
    s = s * scale + tl.sum(e, 1)
    return m_new, s, a


@triton.jit
def _tile_ids(num_n, num_v, GROUP: tl.constexpr):
    """``(row block, vocabulary block)`` of this program. ``GROUP == 0`` (v1): a 2-D grid, row
    blocks fastest, so all row blocks of one vocabulary block run together and every row block's
    hidden states cycle through L2 once per vocabulary block. ``GROUP > 0`` (v2): a 1-D grid in
    grouped order: ``GROUP`` row blocks walk the vocabulary together (their hidden rows stay in L2
    while the weight streams past once per group). The order changes nothing in the results."""
    if GROUP == 0:
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
    else:
        pid = tl.program_id(0)
        width = GROUP * num_v
        first = (pid // width) * GROUP
        size = tl.minimum(num_n - first, GROUP)
        pid_n = first + (pid % width) % size
        pid_v = (pid % width) // size
    return pid_n, pid_v


@triton.jit
def _linear_lse_fwd_kernel(
    # pointers
    h0_ptr,  # (N, D) hidden states of stream 0, last dim contiguous
    h1_ptr,  # (N, D) stream 1 (unused unless NUM_STREAMS >= 2)
    h2_ptr,  # (N, D) stream 2 (unused unless NUM_STREAMS == 3)
    w_ptr,  # (V, D) head weight, same dtype, last dim contiguous
    b_ptr,  # (V,) bias (unused unless HAS_BIAS)
    targets_ptr,  # (N,) int; ids outside [0, V) (ignore_index) never match a column
    part_m_ptr,  # (NUM_STREAMS, n_splits, N) fp32 out: running max per split
    part_s_ptr,  # (NUM_STREAMS, n_splits, N) fp32 out: sum exp(z - m) per split
    part_a_ptr,  # (NUM_STREAMS, n_splits, N) fp32 out: sum exp(z - m)(z - m) (if COMPUTE_ENTROPY)
    zt_ptr,  # (NUM_STREAMS, N) fp32 out: target logit, written by the split holding the target
    # sizes and strides (elements)
    N,
    V,
    D,
    stride_h0,
    stride_h1,
    stride_h2,
    stride_w,
    # scalars
    inv_temperature,
    # meta-parameters
    NUM_STREAMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    SPLIT_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP: tl.constexpr = 0,  # launch order (see _tile_ids)
):
    pid_n, pid_s = _tile_ids(tl.cdiv(N, BLOCK_N), tl.cdiv(V, SPLIT_V), GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    v_lo = pid_s * SPLIT_V
    v_hi = tl.minimum(v_lo + SPLIT_V, V)
    owns = row_ok & (tgt >= v_lo) & (tgt < v_hi)
    # the target's column inside this split as int32 (-1: not here), compared with int32 columns
    tgt_local = tl.where(owns, tgt - v_lo, -1).to(tl.int32)
    m0 = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s0 = tl.zeros((BLOCK_N,), tl.float32)
    a0 = tl.zeros((BLOCK_N,), tl.float32)
    t0 = tl.zeros((BLOCK_N,), tl.float32)
    m1 = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    a1 = tl.zeros((BLOCK_N,), tl.float32)
    t1 = tl.zeros((BLOCK_N,), tl.float32)
    m2 = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s2 = tl.zeros((BLOCK_N,), tl.float32)
    a2 = tl.zeros((BLOCK_N,), tl.float32)
    t2 = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        acc0 = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            # (BLOCK_K, BLOCK_V) tile of W^T, loaded once for every stream
            wt = tl.load(
                w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None],
                mask=col_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            h_mask = row_ok[:, None] & k_ok[None, :]
            h = tl.load(h0_ptr + rows[:, None] * stride_h0 + ks[None, :], mask=h_mask, other=0.0)
            acc0 = _dot(h, wt, acc0, UPCAST, PRECISION)
            if NUM_STREAMS >= 2:
                h = tl.load(h1_ptr + rows[:, None] * stride_h1 + ks[None, :], mask=h_mask, other=0.0)
                acc1 = _dot(h, wt, acc1, UPCAST, PRECISION)
            if NUM_STREAMS == 3:
                h = tl.load(h2_ptr + rows[:, None] * stride_h2 + ks[None, :], mask=h_mask, other=0.0)
                acc2 = _dot(h, wt, acc2, UPCAST, PRECISION)
        is_target = (cols - v_lo)[None, :] == tgt_local[:, None]
        z = _logits_tile(acc0, b_ptr, cols, col_ok, inv_temperature, HAS_BIAS)
        m0, s0, a0 = _online_update(m0, s0, a0, z, COMPUTE_ENTROPY)
        t0 += tl.sum(tl.where(is_target, z, 0.0), 1)
        if NUM_STREAMS >= 2:
            z = _logits_tile(acc1, b_ptr, cols, col_ok, inv_temperature, HAS_BIAS)
            m1, s1, a1 = _online_update(m1, s1, a1, z, COMPUTE_ENTROPY)
            t1 += tl.sum(tl.where(is_target, z, 0.0), 1)
        if NUM_STREAMS == 3:
            z = _logits_tile(acc2, b_ptr, cols, col_ok, inv_temperature, HAS_BIAS)
            m2, s2, a2 = _online_update(m2, s2, a2, z, COMPUTE_ENTROPY)
            t2 += tl.sum(tl.where(is_target, z, 0.0), 1)
    n_splits = tl.cdiv(V, SPLIT_V)  # (not tl.num_programs(1): the grouped grid is 1-D)
    stream_stride = n_splits.to(tl.int64) * N
    off = pid_s.to(tl.int64) * N + rows
    tl.store(part_m_ptr + off, m0, mask=row_ok)
    tl.store(part_s_ptr + off, s0, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(part_a_ptr + off, a0, mask=row_ok)
    tl.store(zt_ptr + rows, t0, mask=owns)
    if NUM_STREAMS >= 2:
        tl.store(part_m_ptr + stream_stride + off, m1, mask=row_ok)
        tl.store(part_s_ptr + stream_stride + off, s1, mask=row_ok)
        if COMPUTE_ENTROPY:
            tl.store(part_a_ptr + stream_stride + off, a1, mask=row_ok)
        tl.store(zt_ptr + N + rows, t1, mask=owns)
    if NUM_STREAMS == 3:
        tl.store(part_m_ptr + 2 * stream_stride + off, m2, mask=row_ok)
        tl.store(part_s_ptr + 2 * stream_stride + off, s2, mask=row_ok)
        if COMPUTE_ENTROPY:
            tl.store(part_a_ptr + 2 * stream_stride + off, a2, mask=row_ok)
        tl.store(zt_ptr + 2 * N + rows, t2, mask=owns)


@triton.jit
def _merge_splits(
    part_m_ptr,
    part_s_ptr,
    part_a_ptr,
    base,
    rows,
    row_ok,
    N,
    n_splits,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge one stream's per-split ``(m, s, a)`` in split order. Returns ``(lse, entropy)``."""
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    a = tl.zeros((BLOCK,), tl.float32)
    off = base + rows  # int64; advanced by N per split
    for _ in range(0, n_splits):
        m_j = tl.load(part_m_ptr + off, mask=row_ok, other=float("-inf"))
        s_j = tl.load(part_s_ptr + off, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_j)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        scale_j = tl.exp(m_j - shift)
        if COMPUTE_ENTROPY:
            a_j = tl.load(part_a_ptr + off, mask=row_ok, other=0.0)
            a = tl.where(s > 0, scale * (a + s * (m - shift)), 0.0) + tl.where(
                s_j > 0, scale_j * (a_j + s_j * (m_j - shift)), 0.0
            )
        s = s * scale + s_j * scale_j
        m = m_new
        off += N
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse = shift + tl.log(s)
    entropy = tl.where(s > 0, tl.log(s) - a / s, 0.0)
    return lse, entropy


@triton.jit
def _linear_logprobs_combine_kernel(
    # pointers
    part_m_ptr,  # (n_splits, N) fp32 from the forward kernel
    part_s_ptr,  # (n_splits, N) fp32
    part_a_ptr,  # (n_splits, N) fp32 (unused unless COMPUTE_ENTROPY)
    zt_ptr,  # (N,) fp32 target logits
    targets_ptr,  # (N,) int
    logp_ptr,  # (N,) fp32 out
    entropy_ptr,  # (N,) fp32 out (unused unless COMPUTE_ENTROPY)
    lse_ptr,  # (N,) fp32 out, for the backward (0 on ignored rows)
    # sizes
    N,
    n_splits,
    # scalars
    ignore_index,
    # meta-parameters
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    keep = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64) != ignore_index
    lse, entropy = _merge_splits(
        part_m_ptr, part_s_ptr, part_a_ptr, 0, rows, row_ok, N, n_splits, COMPUTE_ENTROPY, BLOCK
    )
    logp = tl.load(zt_ptr + rows, mask=row_ok, other=0.0) - lse
    tl.store(logp_ptr + rows, tl.where(keep, logp, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(keep, lse, 0.0), mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(keep, entropy, 0.0), mask=row_ok)


@triton.jit
def _linear_contrastive_combine_kernel(
    # pointers
    part_m_ptr,  # (NUM_STREAMS, n_splits, N) fp32; streams [policy,] pos, neg
    part_s_ptr,  # (NUM_STREAMS, n_splits, N) fp32
    zt_ptr,  # (NUM_STREAMS, N) fp32 target logits
    targets_ptr,  # (N,) int; ignore_index where the token does not count
    adv_ptr,  # (N,) fp32 per-token advantage
    sign_ptr,  # (N,) fp32 per-token sign of the sequence's advantage
    out_policy_ptr,  # (N,) fp32 out (unused unless HAS_POLICY)
    out_pos_ptr,  # (N,) fp32 out
    out_neg_ptr,  # (N,) fp32 out
    out_weight_ptr,  # (N,) fp32 out
    out_adv_ptr,  # (N,) fp32 out
    # sizes
    N,
    n_splits,
    pos_base,  # offset of the pos stream in part_* (FIRST * n_splits * N)
    neg_base,  # offset of the neg stream in part_*
    # scalars
    ignore_index,
    lam,
    eps_w,
    # meta-parameters
    HAS_POLICY: tl.constexpr,
    FIRST: tl.constexpr,  # index of the pos stream: 1 with a policy stream, else 0
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    keep = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64) != ignore_index
    if HAS_POLICY:
        lse, _ = _merge_splits(part_m_ptr, part_s_ptr, part_s_ptr, 0, rows, row_ok, N, n_splits, False, BLOCK)
        pol = tl.load(zt_ptr + rows, mask=row_ok, other=0.0) - lse
        tl.store(out_policy_ptr + rows, tl.where(keep, pol, 0.0), mask=row_ok)
    lse, _ = _merge_splits(part_m_ptr, part_s_ptr, part_s_ptr, pos_base, rows, row_ok, N, n_splits, False, BLOCK)
    pos = tl.where(keep, tl.load(zt_ptr + FIRST * N + rows, mask=row_ok, other=0.0) - lse, 0.0)
    lse, _ = _merge_splits(part_m_ptr, part_s_ptr, part_s_ptr, neg_base, rows, row_ok, N, n_splits, False, BLOCK)
    neg = tl.where(keep, tl.load(zt_ptr + (FIRST + 1) * N + rows, mask=row_ok, other=0.0) - lse, 0.0)
    adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0)
    sign = tl.load(sign_ptr + rows, mask=row_ok, other=0.0)
    c, a = contrastive_weight(pos, neg, adv, sign, keep, lam, eps_w)
    tl.store(out_pos_ptr + rows, pos, mask=row_ok)
    tl.store(out_neg_ptr + rows, neg, mask=row_ok)
    tl.store(out_weight_ptr + rows, c, mask=row_ok)
    tl.store(out_adv_ptr + rows, a, mask=row_ok)


@triton.jit
def _linear_grad_logits_kernel(
    # pointers
    h_ptr,  # (N, D) hidden states, last dim contiguous
    w_ptr,  # (V, D) head weight, last dim contiguous
    b_ptr,  # (V,) bias (unused unless HAS_BIAS)
    targets_ptr,  # (N,) int
    lse_ptr,  # (N,) fp32 from the forward
    entropy_ptr,  # (N,) fp32 from the forward (unused unless HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) upstream gradient of logp (unused unless HAS_GRAD_LOGP)
    grad_entropy_ptr,  # (N,) upstream gradient of the entropy (unused unless HAS_GRAD_ENTROPY)
    g_ptr,  # (N, V_chunk) out: dL/dlogits for columns [v_lo, v_lo + V_chunk), in g's dtype
    # sizes and strides (elements)
    N,
    D,
    v_lo,
    v_hi,
    stride_h,
    stride_w,
    stride_g,
    # scalars
    inv_temperature,
    ignore_index,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP: tl.constexpr = 0,  # launch order (see _tile_ids)
):
    pid_n, pid_v = _tile_ids(tl.cdiv(N, BLOCK_N), tl.cdiv(v_hi - v_lo, BLOCK_V), GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    cols = v_lo + local
    row_ok = rows < N
    col_ok = cols < v_hi
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    live = row_ok & (tgt != ignore_index)
    tgt_local = tl.where(live & (tgt >= v_lo) & (tgt < v_hi), tgt - v_lo, -1).to(tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        wt = tl.load(
            w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(h, wt, acc, UPCAST, PRECISION)
    z = _logits_tile(acc, b_ptr, cols, col_ok, inv_temperature, HAS_BIAS)
    lse = tl.where(live, tl.load(lse_ptr + rows, mask=row_ok, other=0.0), 0.0)
    p = tl.exp(z - lse[:, None])  # 0 past v_hi
    d = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + rows, mask=live, other=0.0).to(tl.float32)
        d = g[:, None] * (tl.where(local[None, :] == tgt_local[:, None], 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        e = tl.load(grad_entropy_ptr + rows, mask=live, other=0.0).to(tl.float32)
        mean_z = lse - tl.load(entropy_ptr + rows, mask=live, other=0.0)
        d -= e[:, None] * tl.where(col_ok[None, :], p * (z - mean_z[:, None]), 0.0)
    d = tl.where(live[:, None] & col_ok[None, :], d * inv_temperature, 0.0)
    tl.store(
        g_ptr + rows[:, None] * stride_g + local[None, :],
        d.to(g_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr,  # (M, K) any strides
    b_ptr,  # (K, P) any strides
    c_ptr,  # (M, P) out; read and added to when ACCUMULATE
    # sizes and strides (elements)
    M,
    P,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bp,
    stride_cm,
    stride_cp,
    # meta-parameters
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    P_FASTEST: tl.constexpr = False,  # v2: program_id(0) walks the P (D) tiles, so an A row block is re-read from L2
):
    """``C (+)= A @ B`` with the whole K-sum in one program's fp32 accumulator (deterministic)."""
    if P_FASTEST:
        pid_m = tl.program_id(1)
        pid_p = tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
        pid_p = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m_ok = rm < M
    p_ok = rp < P
    acc = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = rk < K
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + rk[:, None] * stride_bk + rp[None, :] * stride_bp, mask=k_ok[:, None] & p_ok[None, :], other=0.0
        )
        acc = _dot(a, b, acc, UPCAST, PRECISION)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp
    c_mask = m_ok[:, None] & p_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------
# launchers


def _forward_partials(hiddens, weight, bias, targets, temperature, want_entropy):
    """Run the forward kernel over 1-3 streams. Returns ``(part (3, S, n_splits, N), zt (S, N),
    n_splits)``."""
    n, d = hiddens[0].shape
    v = weight.shape[0]
    cfg = config(weight.dtype)
    n_splits = triton.cdiv(v, cfg.split_v)
    ns = len(hiddens)
    dev = weight.device
    part = torch.empty((3, ns, n_splits, n), dtype=torch.float32, device=dev)
    zt = torch.zeros((ns, n), dtype=torch.float32, device=dev)
    if n == 0:
        return part, zt, n_splits
    h = list(hiddens) + [hiddens[0]] * (3 - ns)
    group = _group_m()
    grid = (triton.cdiv(n, cfg.block_n), n_splits) if group == 0 else (triton.cdiv(n, cfg.block_n) * n_splits,)
    _linear_lse_fwd_kernel[grid](
        h[0], h[1], h[2], weight, bias if bias is not None else weight, targets,
        part[0], part[1], part[2], zt,
        n, v, d, h[0].stride(0), h[1].stride(0), h[2].stride(0), weight.stride(0),
        1.0 / temperature,
        NUM_STREAMS=ns, HAS_BIAS=bias is not None, COMPUTE_ENTROPY=want_entropy, SPLIT_V=cfg.split_v,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, GROUP=group, **dot_meta(weight.dtype),
    )  # fmt: skip
    return part, zt, n_splits


COMBINE_BLOCK = 256


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Same contract as ``reference.linear_logprobs.linear_logprobs_forward``: fp32
    ``(logp, entropy or None, lse)``, each ``(N,)``."""
    n = hidden.shape[0]
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = torch.empty(n, dtype=torch.float32, device=dev) if want_entropy else None
    if n == 0:
        return logp, entropy, lse
    part, zt, n_splits = _forward_partials([hidden], weight, bias, targets, temperature, want_entropy)
    _linear_logprobs_combine_kernel[(triton.cdiv(n, COMBINE_BLOCK),)](
        part[0, 0], part[1, 0], part[2, 0], zt[0], targets,
        logp, entropy if want_entropy else logp, lse,
        n, n_splits, ignore_index,
        COMPUTE_ENTROPY=want_entropy, BLOCK=COMBINE_BLOCK,
    )  # fmt: skip
    return logp, entropy, lse


def linear_contrastive_logprobs_fwd(
    policy_hidden,
    pos_hidden,
    neg_hidden,
    weight,
    bias,
    targets,
    a_tok,
    sign,
    keep,
    lam,
    eps_w,
    temperature,
    ignore_index,
):
    """Same contract as ``reference.linear_logprobs.linear_contrastive_logprobs_forward``
    (flat ``(N, D)`` hidden streams with contiguous last dims); ``keep`` is already folded into
    ``targets``."""
    n = pos_hidden.shape[0]
    dev = pos_hidden.device
    outs = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(5)]
    policy_out, pos_out, neg_out, w_out, adv_out = outs
    has_policy = policy_hidden is not None
    if n:
        streams = [h for h in (policy_hidden, pos_hidden, neg_hidden) if h is not None]
        part, zt, n_splits = _forward_partials(streams, weight, bias, targets, temperature, False)
        _linear_contrastive_combine_kernel[(triton.cdiv(n, COMBINE_BLOCK),)](
            part[0], part[1], zt, targets,
            a_tok.to(torch.float32).contiguous(), sign.to(torch.float32).contiguous(),
            policy_out, pos_out, neg_out, w_out, adv_out,
            n, n_splits, int(has_policy) * n_splits * n, (int(has_policy) + 1) * n_splits * n,
            ignore_index, lam, eps_w,
            HAS_POLICY=has_policy, FIRST=int(has_policy), BLOCK=COMBINE_BLOCK,
        )  # fmt: skip
    return (policy_out if has_policy else None), pos_out, neg_out, w_out, adv_out


# v2: the backward's vocabulary chunk is this many columns whatever N is, so each row's d hidden
# (accumulated chunk by chunk in fp32) is bit-identical for any batch; the gradient block is then
# N x FIXED_VOCAB_CHUNK (128 MiB of bf16 at N = 8192).
FIXED_VOCAB_CHUNK = 8192


def _group_m() -> int:
    """Launch-order group of the forward and logits-gradient grids (0: v1's 2-D grid)."""
    g = int(configs.get("linear_logprobs")["group_m"])
    return 0 if g <= 1 else g


def vocab_chunk(n: int, v: int, element_size: int, block_v: int) -> int:
    """Columns per backward chunk. v1: as many as fit ``G_BUDGET_BYTES`` for ``n`` rows (so it
    depends on N, and with it the fp32 summation order of d hidden), a multiple of ``block_v``, at
    least ``block_v``, at most ``V`` rounded up. v2: ``FIXED_VOCAB_CHUNK`` (rounded to ``block_v``),
    independent of N: batch-invariant gradients."""
    whole = triton.cdiv(v, block_v) * block_v
    if _group_m():
        return max(block_v, min(whole, FIXED_VOCAB_CHUNK // block_v * block_v))
    fit = G_BUDGET_BYTES // max(1, n * element_size)
    return max(block_v, min(whole, fit // block_v * block_v))


def _matmul(a, b, c, accumulate, cfg, dtype):
    """``c (+)= a @ b`` for 2-D strided tensors (``a``/``b`` in ``dtype``)."""
    m, k = a.shape
    p = b.shape[1]
    p_fastest = _group_m() > 0  # v2: D-fastest order
    # the accumulating (dh) matmul also holds the fp32 C tile: v2 halves its width (no spill)
    block_p = min(cfg.mm_block, int(configs.get("linear_logprobs")["dh_block_p"])) if accumulate else cfg.mm_block
    grid = (triton.cdiv(m, cfg.mm_block), triton.cdiv(p, block_p))
    _matmul_kernel[grid[::-1] if p_fastest else grid](
        a, b, c, m, p, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, BLOCK_M=cfg.mm_block, BLOCK_P=block_p, BLOCK_K=cfg.mm_block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, P_FASTEST=p_fastest, **dot_meta(dtype),
    )  # fmt: skip


def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``reference.linear_logprobs.linear_logprobs_backward``."""
    need_h, need_w, need_b = needs
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = config(weight.dtype)
    dh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h else None
    dw = torch.empty_like(weight) if need_w else None  # every row is written, chunk by chunk
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    if n == 0:
        if need_w:
            dw.zero_()
    else:
        vc = vocab_chunk(n, v, hidden.element_size(), cfg.block_v)
        grad_block = torch.empty((n, vc), dtype=hidden.dtype, device=dev)
        dummy = lse
        for v_lo in range(0, v, vc):
            v_hi = min(v, v_lo + vc)
            width = v_hi - v_lo
            group = _group_m()
            tiles = (triton.cdiv(n, cfg.block_n), triton.cdiv(width, cfg.block_v))
            _linear_grad_logits_kernel[tiles if group == 0 else (tiles[0] * tiles[1],)](
                hidden, weight, bias if bias is not None else weight, targets, lse,
                entropy if entropy is not None else dummy,
                grad_logp if grad_logp is not None else dummy,
                grad_entropy if grad_entropy is not None else dummy,
                grad_block,
                n, d, v_lo, v_hi, hidden.stride(0), weight.stride(0), grad_block.stride(0),
                1.0 / temperature, ignore_index,
                HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None,
                HAS_GRAD_ENTROPY=grad_entropy is not None,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, GROUP=group, **dot_meta(weight.dtype),
            )  # fmt: skip
            g = grad_block[:, :width]
            if need_h and d > 0:
                _matmul(g, weight[v_lo:v_hi], dh, True, cfg, hidden.dtype)
            if need_w and d > 0:
                _matmul(g.T, hidden, dw[v_lo:v_hi], False, cfg, hidden.dtype)
            if need_b:
                db[v_lo:v_hi] = g.sum(0, dtype=torch.float32)
    return (
        dh.to(hidden.dtype) if need_h else None,
        dw,
        db.to(bias.dtype) if need_b else None,
    )
