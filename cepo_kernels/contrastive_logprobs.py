"""``contrastive_logprobs``: token log-probs under the policy, ``r+`` and ``r-`` contexts and
the CEPO advantages, from logits, in one pass over each logits row. No gradient."""

from __future__ import annotations

from typing import NamedTuple

import torch

from cepo_kernels import _dispatch, _validate
from cepo_kernels.reference.contrastive_advantage import accumulation_dtype, token_advantages_and_sign
from cepo_kernels.reference.contrastive_logprobs import contrastive_logprobs_forward

OP = "contrastive_logprobs"
# Triton first: the cuda backend has not yet been measured faster on a GPU (docs/cuda_extension.md).
ORDER = ("triton", "cuda", "torch")
DTYPES = {"torch": _validate.FLOAT_DTYPES}


class ContrastiveLogprobs(NamedTuple):
    """Per-token results, each of the targets' shape ``(..., T)``, float32 (float64 on the
    torch backend for float64 inputs). ``policy`` is None when no policy logits were given."""

    policy: torch.Tensor | None
    pos: torch.Tensor
    neg: torch.Tensor
    weights: torch.Tensor
    advantages: torch.Tensor


def _forward_impl(backend: str):
    if backend == "triton":
        from cepo_kernels.triton.contrastive_logprobs import contrastive_logprobs_fwd

        return contrastive_logprobs_fwd
    if backend == "cuda":
        from cepo_kernels.cuda.ops import contrastive_logprobs_fwd

        return contrastive_logprobs_fwd
    return contrastive_logprobs_forward


def prepare_contrastive_inputs(targets, advantages, mask, ignore_index, dtype):
    """Validated per-token inputs in flat form: ``(targets, a_tok, sign, keep)``, each ``(N,)``,
    with ``targets`` set to ``ignore_index`` wherever the token does not count."""
    shape = tuple(targets.shape)
    keep = targets != ignore_index
    if mask is not None:
        keep = keep & mask
    a_tok, sign = token_advantages_and_sign(advantages, shape, keep, dtype)
    flat_targets = torch.where(keep, targets, torch.full_like(targets, ignore_index)).reshape(-1)
    return flat_targets, a_tok.reshape(-1), sign.reshape(-1), keep.reshape(-1)


def flat_rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """``(..., W)`` as ``(N, W)`` with a contiguous last dim (a view when it can be); None stays None."""
    if x is None:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def shaped_results(outs, token_shape, bad) -> ContrastiveLogprobs:
    """The flat ``(policy or None, pos, neg, weights, advantages)`` of a backend in the targets'
    shape, with NaN log-probs at out-of-range targets (weights and advantages already treat them
    as masked)."""
    outs = [o.view(token_shape) if o is not None else None for o in outs]
    for i in range(3):
        outs[i] = _validate.mark_bad(outs[i], bad)
    return ContrastiveLogprobs(*outs)


def check_contrastive_options(targets, advantages, mask, lam, eps_w, temperature):
    """The checks shared by the logits and hidden-state contrastive ops; returns ``(lam, eps_w,
    temperature, mask as bool or None)``."""
    _validate.check_int("targets", targets)
    if targets.dim() < 1:
        raise ValueError(f"targets: expected shape (..., T), got {tuple(targets.shape)}")
    _validate.check_advantages(advantages, tuple(targets.shape))
    mask = _validate.check_mask(mask, tuple(targets.shape))
    lam, eps_w = _validate.check_lam_eps(lam, eps_w)
    return lam, eps_w, _validate.check_temperature(temperature), mask


@torch.no_grad()
def contrastive_logprobs(
    policy_logits: torch.Tensor | None,
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    lam: float,
    eps_w: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    validate: bool | None = None,
) -> ContrastiveLogprobs:
    """Log-probs of ``targets`` under three contexts and the CEPO advantages, in one pass.

    Args:
        policy_logits: ``(..., T, V)`` logits of ``[prompt, y]``, or None to skip that stream.
        pos_logits: ``(..., T, V)`` logits of ``[prompt, r+, y]`` at the response positions.
        neg_logits: ``(..., T, V)`` logits of ``[prompt, r-, y]`` at the response positions.
            All logits float16/bfloat16/float32 (float64 on the torch backend), same shape.
        targets: ``(..., T)`` integer response tokens ``y_t``.
        advantages: ``(...)`` per sequence, or ``(..., T)`` per token; float.
        lam, eps_w: weighting strength in ``[0, 1]`` and clip half-width in ``[0, 1)``.
        temperature: finite, > 0; logits are divided by it.
        mask: ``(..., T)`` bool, integer or float (TRL / verl 0/1 masks); nonzero where the token
            counts. Tokens equal to ``ignore_index`` never count.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        validate: check the target range with one host sync (raises ``ValueError``);
            ``None`` (default) does so only for CPU tensors and never under ``torch.compile``.
            Without the check nothing syncs and an out-of-range target (where the mask counts)
            gives NaN log-probs and is treated as masked (weight 1, advantage 0).

    Returns:
        ``ContrastiveLogprobs(policy, pos, neg, weights, advantages)``: log-probs
        ``log softmax(logits / T)[y_t]`` per stream, the clipped weights
        ``c_t = clip(exp(sign(A) * (pos - neg)), 1 - eps_w, 1 + eps_w)`` and
        ``A_t = A * ((1 - lam) + lam * c_t)`` (see ``contrastive_advantage``). Masked tokens get
        log-probs 0, weight 1 and advantage 0.
    """
    lam, eps_w, temperature, mask = check_contrastive_options(targets, advantages, mask, lam, eps_w, temperature)
    token_shape = tuple(targets.shape)
    streams = {"policy_logits": policy_logits, "pos_logits": pos_logits, "neg_logits": neg_logits}
    for name, logits in streams.items():
        if logits is None and name == "policy_logits":
            continue
        _validate.check_float(name, logits, min_dim=2)
        _validate.check_shape(name, logits, (*token_shape, pos_logits.shape[-1]), "targets.shape + (V,)")
    _validate.check_same_device(targets=targets, advantages=advantages, mask=mask, **streams)
    vocab = pos_logits.shape[-1]
    if vocab == 0:
        raise ValueError("pos_logits: expected a vocabulary dimension of at least 1, got 0")
    targets, bad = _validate.screen_targets(targets, vocab, ignore_index, validate, mask)
    tensors = [policy_logits, pos_logits, neg_logits, advantages]
    chosen = _dispatch.resolve(OP, backend, ORDER, tensors, dtypes=DTYPES)

    dtype = accumulation_dtype(*tensors) if chosen == "torch" else torch.float32
    flat_targets, a_tok, sign, keep = prepare_contrastive_inputs(targets, advantages, mask, ignore_index, dtype)

    forward = _forward_impl(chosen)
    outs = forward(
        flat_rows(policy_logits), flat_rows(pos_logits), flat_rows(neg_logits), flat_targets, a_tok, sign, keep,
        lam, eps_w, temperature, int(ignore_index),
    )  # fmt: skip
    return shaped_results(outs, token_shape, bad)
