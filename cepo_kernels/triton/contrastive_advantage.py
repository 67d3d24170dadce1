"""Triton kernel for the CEPO weighting alone (elementwise over tokens), and the
``contrastive_weight`` helper that the fused log-prob kernels call in their final step.

Formula (see ``cepo_kernels/reference/contrastive_advantage.py``)::

    c = clip(exp(s * (pos - neg)), 1 - eps_w, 1 + eps_w)   # 1 if pos - neg is NaN or s == 0
    A_t = A * (1 + lam * (c - 1)),   A_t = 0 and c = 1 where masked
"""

import torch
import triton
import triton.language as tl


@triton.jit
def contrastive_weight(pos, neg, adv, sign, keep, lam, eps_w):
    """Per-token ``(weight, advantage)`` from fp32 log-probs, advantage, sign and keep-mask."""
    delta = pos - neg
    undefined = (delta != delta) | (sign == 0)
    w = tl.exp(tl.where(undefined, 0.0, sign * delta))
    c = tl.minimum(tl.maximum(w, 1.0 - eps_w), 1.0 + eps_w)
    c = tl.where(keep, c, 1.0)
    a = tl.where(keep, adv * (1.0 + lam * (c - 1.0)), 0.0)
    return c, a


@triton.jit
def _contrastive_advantage_kernel(
    # pointers, all (N,) contiguous
    adv_ptr,  # fp32 per-token advantage (expanded from per-sequence)
    sign_ptr,  # fp32 per-token sign of the sequence's advantage
    pos_ptr,  # float log-probs under the r+ context
    neg_ptr,  # float log-probs under the r- context
    keep_ptr,  # int8 1 = token counts (unused unless HAS_MASK)
    weight_ptr,  # fp32 out
    out_ptr,  # fp32 out
    # sizes
    N,
    # scalars
    lam,
    eps_w,
    # meta-parameters
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    adv = tl.load(adv_ptr + offs, mask=inside, other=0.0)
    sign = tl.load(sign_ptr + offs, mask=inside, other=0.0)
    pos = tl.load(pos_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    neg = tl.load(neg_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    keep = inside
    if HAS_MASK:
        keep = tl.load(keep_ptr + offs, mask=inside, other=0) != 0
    c, a = contrastive_weight(pos, neg, adv, sign, keep, lam, eps_w)
    tl.store(weight_ptr + offs, c, mask=inside)
    tl.store(out_ptr + offs, a, mask=inside)


def contrastive_advantage_fwd(
    adv_tok: torch.Tensor,
    sign_tok: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    lam: float,
    eps_w: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch over flat ``(N,)`` inputs (fp32 ``adv_tok``/``sign_tok``). Returns
    ``(advantages, weights)``, fp32 ``(N,)``."""
    n = pos.numel()
    weights = torch.empty(n, dtype=torch.float32, device=pos.device)
    out = torch.empty(n, dtype=torch.float32, device=pos.device)
    if n:
        block = 1024
        keep = mask.reshape(-1).to(torch.int8) if mask is not None else weights
        _contrastive_advantage_kernel[(triton.cdiv(n, block),)](
            adv_tok.reshape(-1).contiguous(), sign_tok.reshape(-1).contiguous(),
            pos.reshape(-1).contiguous(), neg.reshape(-1).contiguous(), keep,
            weights, out, n, lam, eps_w,
            HAS_MASK=mask is not None, BLOCK=block,
        )  # fmt: skip
    return out, weights
