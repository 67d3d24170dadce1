"""Reference (plain PyTorch) for ``contrastive_logprobs``: token log-probs under up to three
contexts, then the CEPO weighting. Reads each logits tensor separately (the kernels read
each row once); chunked over rows like ``token_logprobs``."""

from __future__ import annotations

import torch

from cepo_kernels.reference.contrastive_advantage import contrastive_weights_reference
from cepo_kernels.reference.token_logprobs import token_logprobs_forward


def contrastive_logprobs_forward(
    policy_logits: torch.Tensor | None,
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    targets: torch.Tensor,
    a_tok: torch.Tensor,
    sign: torch.Tensor,
    keep: torch.Tensor,
    lam: float,
    eps_w: float,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat inputs: logits ``(N, V)``, ``targets``/``a_tok``/``sign``/``keep`` ``(N,)`` with
    ``targets == ignore_index`` wherever ``keep`` is False.

    Returns ``(policy or None, pos, neg, weights, advantages)``, each ``(N,)`` fp32 (fp64 for
    fp64 logits)."""

    def logp(logits):
        return token_logprobs_forward(logits, targets, temperature, ignore_index, False)[0]

    policy = logp(policy_logits) if policy_logits is not None else None
    pos, neg = logp(pos_logits), logp(neg_logits)
    weights, adv = contrastive_weights_reference(a_tok.to(pos.dtype), sign.to(pos.dtype), pos, neg, lam, eps_w, keep)
    return policy, pos, neg, weights, adv
