"""Triton kernel for ``contrastive_logprobs``: one program per token reads the token's row of
policy, ``r+`` and ``r-`` logits once each (online log-sum-exp in fp32, the target logit as
a scalar), then applies the CEPO weighting in its final step.

Offsets are int64 (row index widened before the stride multiply).
"""

import torch
import triton
import triton.language as tl

from cepo_kernels.triton._online_softmax import finish_lse, lane_lse_update, lanes_lse2, online_lse_update
from cepo_kernels.triton.contrastive_advantage import contrastive_weight
from cepo_kernels.triton.token_logprobs import LOG2E, _block_v, _config, _num_warps


@triton.jit
def _row_logprob(row_ptr, target, n_cols, V, inv_temperature, BLOCK_V: tl.constexpr):
    """fp32 ``log softmax(row / T)[target]`` of one row; 0 when ``n_cols == 0`` (masked)."""
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m, s = online_lse_update(m, s, z)
    lse = finish_lse(m, s)
    z_t = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    logp = tl.where(lse == float("-inf"), float("-inf"), z_t - lse)
    return tl.where(n_cols == 0, 0.0, logp)


@triton.jit
def _contrastive_logprobs_kernel(
    # pointers
    policy_ptr,  # (N, V) logits under [prompt, y] (unused unless HAS_POLICY)
    pos_ptr,  # (N, V) logits under [prompt, r+, y]
    neg_ptr,  # (N, V) logits under [prompt, r-, y]
    targets_ptr,  # (N,) int; ignore_index where masked
    adv_ptr,  # (N,) fp32 per-token advantage
    sign_ptr,  # (N,) fp32 per-token sign of the sequence's advantage
    out_policy_ptr,  # (N,) fp32 out (unused unless HAS_POLICY)
    out_pos_ptr,  # (N,) fp32 out
    out_neg_ptr,  # (N,) fp32 out
    out_weight_ptr,  # (N,) fp32 out
    out_adv_ptr,  # (N,) fp32 out
    # sizes and strides
    V,
    stride_policy_row,
    stride_pos_row,
    stride_neg_row,
    # scalars
    inv_temperature,
    ignore_index,
    lam,
    eps_w,
    # meta-parameters
    HAS_POLICY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    keep = target != ignore_index
    n_cols = tl.where(keep, V, 0)
    target = tl.where(keep, target, 0)
    pos = _row_logprob(pos_ptr + row * stride_pos_row, target, n_cols, V, inv_temperature, BLOCK_V)
    neg = _row_logprob(neg_ptr + row * stride_neg_row, target, n_cols, V, inv_temperature, BLOCK_V)
    if HAS_POLICY:
        pol = _row_logprob(policy_ptr + row * stride_policy_row, target, n_cols, V, inv_temperature, BLOCK_V)
        tl.store(out_policy_ptr + row, pol)
    adv = tl.load(adv_ptr + row)
    sign = tl.load(sign_ptr + row)
    c, a = contrastive_weight(pos, neg, adv, sign, keep, lam, eps_w)
    tl.store(out_pos_ptr + row, pos)
    tl.store(out_neg_ptr + row, neg)
    tl.store(out_weight_ptr + row, c)
    tl.store(out_adv_ptr + row, a)


@triton.jit
def _row_logprob_v2(row_ptr, target, n_cols, V, scale2, BLOCK_V: tl.constexpr):
    """Configuration v2 of :func:`_row_logprob`: lane-wise log2-domain log-sum-exp, one
    reduction at the end of the row."""
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale2
        m, s = lane_lse_update(m, s, z)
    lse2 = lanes_lse2(m, s)
    z_t = tl.load(row_ptr + target).to(tl.float32) * scale2
    logp = tl.where(lse2 == float("-inf"), float("-inf"), (z_t - lse2) * 0.6931471805599453)
    return tl.where(n_cols == 0, 0.0, logp)


@triton.jit
def _contrastive_logprobs_v2_kernel(
    # pointers: as _contrastive_logprobs_kernel
    policy_ptr, pos_ptr, neg_ptr, targets_ptr, adv_ptr, sign_ptr,
    out_policy_ptr, out_pos_ptr, out_neg_ptr, out_weight_ptr, out_adv_ptr,
    # sizes and strides
    V, stride_policy_row, stride_pos_row, stride_neg_row,
    # scalars
    scale2,  # log2(e) / T
    ignore_index, lam, eps_w,
    # meta-parameters
    HAS_POLICY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Configuration v2 (log2 domain, lane-wise, int32 target) of the three-stream kernel."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int32)
    keep = target != ignore_index
    n_cols = tl.where(keep, V, 0)
    target = tl.where(keep, target, 0)
    pos = _row_logprob_v2(pos_ptr + row * stride_pos_row, target, n_cols, V, scale2, BLOCK_V)
    neg = _row_logprob_v2(neg_ptr + row * stride_neg_row, target, n_cols, V, scale2, BLOCK_V)
    if HAS_POLICY:
        pol = _row_logprob_v2(policy_ptr + row * stride_policy_row, target, n_cols, V, scale2, BLOCK_V)
        tl.store(out_policy_ptr + row, pol)
    adv = tl.load(adv_ptr + row)
    sign = tl.load(sign_ptr + row)
    c, a = contrastive_weight(pos, neg, adv, sign, keep, lam, eps_w)
    tl.store(out_pos_ptr + row, pos)
    tl.store(out_neg_ptr + row, neg)
    tl.store(out_weight_ptr + row, c)
    tl.store(out_adv_ptr + row, a)


def contrastive_logprobs_fwd(
    policy_logits, pos_logits, neg_logits, targets, a_tok, sign, keep, lam, eps_w, temperature, ignore_index
):
    """Same contract as ``reference.contrastive_logprobs.contrastive_logprobs_forward``
    (flat ``(N, V)`` logits with contiguous last dims); ``keep`` is already folded into
    ``targets``."""
    n, v = pos_logits.shape
    dev = pos_logits.device
    outs = [torch.empty(n, dtype=torch.float32, device=dev) for _ in range(5)]
    policy_out, pos_out, neg_out, w_out, adv_out = outs
    if n:
        has_policy = policy_logits is not None
        pol = policy_logits if has_policy else pos_logits
        v2 = _config()["log2"]
        kernel = _contrastive_logprobs_v2_kernel if v2 else _contrastive_logprobs_kernel
        kernel[(n,)](
            pol, pos_logits, neg_logits, targets,
            a_tok.contiguous(), sign.contiguous(),
            policy_out, pos_out, neg_out, w_out, adv_out,
            v, pol.stride(0), pos_logits.stride(0), neg_logits.stride(0),
            (LOG2E if v2 else 1.0) / temperature, ignore_index, lam, eps_w,
            HAS_POLICY=has_policy, BLOCK_V=_block_v(v, pos_logits.element_size()),
            num_warps=_num_warps(v),
        )  # fmt: skip
    return (policy_out if policy_logits is not None else None), pos_out, neg_out, w_out, adv_out
