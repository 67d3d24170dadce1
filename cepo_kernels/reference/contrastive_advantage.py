"""Reference (plain PyTorch) for the CEPO weighting.

For a response token ``t`` of a sequence with advantage ``A``::

    delta_t = pos_t - neg_t                      # log P(y_t | r+) - log P(y_t | r-)
    s       = sign(A)                            # per sequence
    w_t     = exp(s * delta_t)                   # 1 where delta_t is NaN (-inf - -inf) or s == 0
    c_t     = clip(w_t, 1 - eps_w, 1 + eps_w)    # the token weight ("weights")
    A_t     = A * (1 + lam * (c_t - 1))          # == A * ((1 - lam) + lam * c_t)

and ``A_t = 0``, ``c_t = 1`` where the token is masked. The form ``1 + lam * (c - 1)``
is the same number as ``(1 - lam) + lam * c`` but gives ``A`` bit-exactly when
``lam == 0`` or ``c == 1``.

For per-token advantages ``(..., T)``, ``s`` is the sign of the masked sum over ``T``.
"""

from __future__ import annotations

import torch


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the precision all references compute in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def token_advantages_and_sign(
    advantages: torch.Tensor, token_shape: tuple[int, ...], mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand advantages to one per token and give each token its sequence's sign.

    Args:
        advantages: ``token_shape[:-1]`` (per sequence) or ``token_shape`` (per token), float.
        token_shape: ``(..., T)``.
        mask: bool ``token_shape`` or None (all tokens count).
    Returns:
        ``(A_tok, sign_tok)``, both ``token_shape`` in ``dtype``.
    """
    a = advantages.to(dtype)
    if tuple(a.shape) == tuple(token_shape[:-1]):
        a_tok = a.unsqueeze(-1).expand(token_shape)
        sign = torch.sign(a).unsqueeze(-1).expand(token_shape)
    else:
        a_tok = a
        summed = (a if mask is None else torch.where(mask, a, torch.zeros((), dtype=dtype, device=a.device))).sum(-1)
        sign = torch.sign(summed).unsqueeze(-1).expand(token_shape)
    return a_tok, sign


def contrastive_weights_reference(
    a_tok: torch.Tensor,
    sign: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    lam: float,
    eps_w: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token weights ``c_t`` and advantages ``A_t`` from per-token ``A``, sign and log-probs.

    All tensors share one shape and the float dtype the math runs in.
    """
    delta = pos - neg
    one = torch.ones((), dtype=delta.dtype, device=delta.device)
    undefined = torch.isnan(delta) | (sign == 0)
    w = torch.where(undefined, one, torch.exp(torch.where(undefined, 0.0, sign * delta)))
    c = w.clamp(1.0 - eps_w, 1.0 + eps_w)
    adv = a_tok * (1.0 + lam * (c - 1.0))
    if mask is not None:
        c = torch.where(mask, c, one)
        adv = torch.where(mask, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    return c, adv


def contrastive_advantage_reference(
    advantages: torch.Tensor,
    pos_logprobs: torch.Tensor,
    neg_logprobs: torch.Tensor,
    *,
    lam: float,
    eps_w: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighting in fp32 (fp64 for fp64 inputs). Returns ``(advantages, weights)``,
    both of ``pos_logprobs.shape``."""
    dtype = accumulation_dtype(advantages, pos_logprobs, neg_logprobs)
    shape = tuple(pos_logprobs.shape)
    a_tok, sign = token_advantages_and_sign(advantages, shape, mask, dtype)
    c, adv = contrastive_weights_reference(
        a_tok, sign, pos_logprobs.to(dtype), neg_logprobs.to(dtype), lam, eps_w, mask
    )
    return adv, c
