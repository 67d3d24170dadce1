"""``contrastive_advantage``: the CEPO per-token weighting, for log-probs computed elsewhere.

No gradient flows through it (advantages are constants in the policy loss).
"""

from __future__ import annotations

import torch

from cepo_kernels import _dispatch, _validate
from cepo_kernels.reference.contrastive_advantage import contrastive_advantage_reference, token_advantages_and_sign

OP = "contrastive_advantage"
# Triton first: the cuda backend has not yet been measured faster on a GPU (docs/cuda_extension.md).
ORDER = ("triton", "cuda", "torch")
DTYPES = {"torch": _validate.FLOAT_DTYPES}


def _launch(backend, a_tok, sign, pos, neg, lam, eps_w, mask):
    """Run the triton or cuda kernel on fp32 per-token ``a_tok``/``sign``; ``(advantages, weights)``."""
    if backend == "triton":
        from cepo_kernels.triton.contrastive_advantage import contrastive_advantage_fwd as launch
    else:
        from cepo_kernels.cuda.ops import contrastive_advantage_fwd as launch
    adv, c = launch(a_tok, sign, pos, neg, lam, eps_w, mask)
    return adv.view(pos.shape), c.view(pos.shape)


@torch.no_grad()
def contrastive_advantage(
    advantages: torch.Tensor,
    pos_logprobs: torch.Tensor,
    neg_logprobs: torch.Tensor,
    *,
    lam: float,
    eps_w: float,
    mask: torch.Tensor | None = None,
    return_weights: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token CEPO advantages from per-token log-probs under the two teacher contexts.

    Args:
        advantages: ``(..., )`` one per sequence, or ``(..., T)`` one per token; float.
        pos_logprobs: ``(..., T)`` float, ``log P(y_t | prompt, r+, y<t)``.
        neg_logprobs: ``(..., T)`` float, ``log P(y_t | prompt, r-, y<t)`` (RLSD: the policy's
            own log-probs).
        lam: in ``[0, 1]``; 0 gives GRPO (``A_t = A`` exactly).
        eps_w: in ``[0, 1)``; the weight is clipped to ``[1 - eps_w, 1 + eps_w]``.
        mask: ``(..., T)`` bool, integer or float (TRL / verl 0/1 masks), nonzero where the token
            counts; None means all count.
        return_weights: also return the clipped weights ``c_t``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``A_t`` of shape ``(..., T)``, float32 (float64 for float64 inputs), and ``c_t`` if
        ``return_weights``. With ``delta = pos - neg``, ``s = sign(A)`` per sequence (for
        per-token advantages, the sign of the masked sum over ``T``)::

            c_t = clip(exp(s * delta_t), 1 - eps_w, 1 + eps_w)   # 1 where delta is NaN or s == 0
            A_t = A * ((1 - lam) + lam * c_t)                    # computed as A * (1 + lam * (c_t - 1))

        ``A_t = 0`` and ``c_t = 1`` at masked tokens. Finite ``A`` never gives NaN or inf.
    """
    _validate.check_float("pos_logprobs", pos_logprobs, min_dim=1)
    _validate.check_float("neg_logprobs", neg_logprobs, min_dim=1)
    _validate.check_shape("neg_logprobs", neg_logprobs, pos_logprobs.shape, "same as pos_logprobs")
    shape = tuple(pos_logprobs.shape)
    _validate.check_advantages(advantages, shape)
    mask = _validate.check_mask(mask, shape)
    _validate.check_same_device(advantages=advantages, pos_logprobs=pos_logprobs, neg_logprobs=neg_logprobs, mask=mask)
    lam, eps_w = _validate.check_lam_eps(lam, eps_w)
    chosen = _dispatch.resolve(OP, backend, ORDER, [advantages, pos_logprobs, neg_logprobs], dtypes=DTYPES)
    if chosen == "torch":
        adv, c = contrastive_advantage_reference(
            advantages, pos_logprobs, neg_logprobs, lam=lam, eps_w=eps_w, mask=mask
        )
    else:
        a_tok, sign = token_advantages_and_sign(advantages, shape, mask, torch.float32)
        adv, c = _launch(chosen, a_tok, sign, pos_logprobs, neg_logprobs, lam, eps_w, mask)
    return (adv, c) if return_weights else adv
