"""Triton kernel for ``contrastive_logprobs``: one program per token reads the token's row of
policy, ``r+`` and ``r-`` logits once each (online log-sum-exp in fp32, the target logit as
a scalar), then applies the CEPO weighting in its final step.

One kernel; the ``LOG2`` switch (configuration ``v2``) runs each row in the log2 domain as in
``token_logprobs`` (``scale = log2(e) / T``, lane-wise state, int32 target compare).
Offsets are int64 (row index widened before the stride multiply).
"""

import torch
import triton
import triton.language as tl

from cepo_kernels.triton import _launch
from cepo_kernels.triton._online_softmax import LN2_K, load_target, row_lse
from cepo_kernels.triton.contrastive_advantage import contrastive_weight

__all__ = ["contrastive_logprobs_fwd"]


@triton.jit
def _row_logprob(row_ptr, target, n_cols, V, scale, LOG2: tl.constexpr, BLOCK_V: tl.constexpr):
    """fp32 ``log softmax(row / T)[target]`` of one row in nats; 0 when ``n_cols == 0`` (masked)."""
    lse, _ = row_lse(row_ptr, n_cols, V, scale, False, LOG2, BLOCK_V)
    z_t = tl.load(row_ptr + target).to(tl.float32) * scale
    logp = tl.where(lse == float("-inf"), float("-inf"), z_t - lse)
    if LOG2:
        logp = logp * LN2_K
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
    scale,  # 1 / T, or log2(e) / T when LOG2
    ignore_index,
    lam,
    eps_w,
    # meta-parameters
    HAS_POLICY: tl.constexpr,
    LOG2: tl.constexpr,  # v2: log2 domain, lane-wise state, int32 target compare
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = load_target(targets_ptr + row, LOG2)
    keep = target != ignore_index
    n_cols = tl.where(keep, V, 0)
    target = tl.where(keep, target, 0)
    pos = _row_logprob(pos_ptr + row * stride_pos_row, target, n_cols, V, scale, LOG2, BLOCK_V)
    neg = _row_logprob(neg_ptr + row * stride_neg_row, target, n_cols, V, scale, LOG2, BLOCK_V)
    if HAS_POLICY:
        pol = _row_logprob(policy_ptr + row * stride_policy_row, target, n_cols, V, scale, LOG2, BLOCK_V)
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
        _contrastive_logprobs_kernel[(n,)](
            pol, pos_logits, neg_logits, targets,
            a_tok.contiguous(), sign.contiguous(),
            policy_out, pos_out, neg_out, w_out, adv_out,
            v, pol.stride(0), pos_logits.stride(0), neg_logits.stride(0),
            _launch.row_scale(temperature), ignore_index, lam, eps_w,
            HAS_POLICY=has_policy, LOG2=_launch.row_settings()["log2"],
            BLOCK_V=_launch.block_v(v, pos_logits.element_size()), num_warps=_launch.num_warps(v),
        )  # fmt: skip
    return (policy_out if policy_logits is not None else None), pos_out, neg_out, w_out, adv_out
