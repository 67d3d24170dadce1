"""The PPO-clipped policy loss, as a pure function of per-token tensors.

Per response token, with ``rho = exp(logp - old_logp)`` and advantage ``A``::

    l_t = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high))
    l_t = min(l_t, -A * dual_clip)                 # dual clip, only where A < 0 (optional)
    l_t *= is_weight_t                             # truncated importance sampling (optional)
    l_t += kl_coef * (exp(ref - logp) - (ref - logp) - 1)   # k3 KL estimator (optional)

``is_weight_t = min(exp(old_logp - sampler_logp), C)`` corrects for a sampler (vLLM) whose
distribution differs slightly from the trainer's old policy (TIS, as in verl and TRL); it is a
constant (no gradient) and scales only the policy-gradient term.

Aggregation (``normalizer`` is computed by the caller over the whole mini-batch, all micro-batches
and all ranks, so that accumulation and data parallelism do not change the objective):

- ``token_mean``: ``sum_{i,t} l_{i,t} / normalizer`` with ``normalizer`` = number of response tokens;
- ``seq_mean``: ``sum_i (sum_t l_{i,t} / n_i) / normalizer`` with ``normalizer`` = number of sequences.
"""

from __future__ import annotations

import torch


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalizer: float,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    loss_agg: str = "token_mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (a 0-dim tensor, differentiable through ``logp``) and detached per-batch sums.

    Args:
        logp, old_logp: ``(B, T)`` float32 log-probs of the response tokens (current / behaviour).
        advantages: ``(B, T)`` per-token (or ``(B,)`` per-sequence) advantages.
        mask: ``(B, T)`` bool, True at response tokens.
        normalizer: see the module docstring (> 0).
        is_weights: optional ``(B, T)`` importance weights of the policy-gradient term (detached).
    Returns:
        ``(loss, stats)`` with stats sums over the masked tokens: ``clipped`` (tokens where the
        clip is active), ``kl``, ``tokens``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    maskf = mask.to(logp.dtype)
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and kl_coef > 0:
        d = (ref_logp - logp).masked_fill(~mask, 0.0)
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
    per_token = per_token * maskf
    if loss_agg == "token_mean":
        loss = per_token.sum() / normalizer
    elif loss_agg == "seq_mean":
        loss = (per_token.sum(-1) / maskf.sum(-1).clamp(min=1)).sum() / normalizer
    else:
        raise ValueError(f"loss_agg: expected 'token_mean' or 'seq_mean', got {loss_agg!r}")
    with torch.no_grad():
        stats = {
            "clipped": ((clipped > unclipped) & mask).sum().float(),
            "kl": (kl * maskf).sum(),
            "tokens": maskf.sum(),
        }
    return loss, stats


def tis_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights ``is_weight_t = min(exp(old - sampler), cap)`` (1 at
    padding), ``(B, R)`` float32: the ``is_weights`` argument of :func:`ppo_loss`."""
    w = torch.exp(old_logp.float() - sampler_logp.to(old_logp.device)).clamp(max=cap)
    return torch.where(mask.to(old_logp.device), w, torch.ones_like(w))
