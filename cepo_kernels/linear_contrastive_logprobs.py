"""``linear_contrastive_logprobs``: token log-probs under the policy, ``r+`` and ``r-`` contexts
and the CEPO advantages, straight from the three final hidden states and the LM-head weight.
One kernel reads each weight tile once for all three streams; no ``N x V`` logits. No gradient.

Backends: ``triton`` (GPU; CPU under ``TRITON_INTERPRET=1``) and ``torch`` (the reference,
chunked over rows and vocabulary). There is no ``cuda`` backend for this op.
"""

from __future__ import annotations

import torch

from cepo_kernels import _autocast, _dispatch, _validate
from cepo_kernels.contrastive_logprobs import (
    ContrastiveLogprobs,
    check_contrastive_options,
    flat_rows,
    prepare_contrastive_inputs,
    shaped_results,
)
from cepo_kernels.linear_token_logprobs import check_head
from cepo_kernels.reference.contrastive_advantage import accumulation_dtype
from cepo_kernels.reference.linear_logprobs import linear_contrastive_logprobs_forward

OP = "linear_contrastive_logprobs"
ORDER = ("triton", "torch")
DTYPES = {"torch": _validate.FLOAT_DTYPES}


def _forward_impl(backend: str):
    if backend == "triton":
        from cepo_kernels.triton.linear_logprobs import linear_contrastive_logprobs_fwd

        return linear_contrastive_logprobs_fwd
    return linear_contrastive_logprobs_forward


@torch.no_grad()
def linear_contrastive_logprobs(
    policy_hidden: torch.Tensor | None,
    pos_hidden: torch.Tensor,
    neg_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    *,
    lam: float,
    eps_w: float,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    validate: bool | None = None,
) -> ContrastiveLogprobs:
    """Log-probs of ``targets`` under three contexts and the CEPO advantages, from hidden states.

    The same result as ``contrastive_logprobs`` applied to the three logits tensors
    ``hidden @ weight.T + bias`` (computed here with an fp32 accumulator, never stored). Inside
    ``torch.autocast`` the float inputs are first cast to the autocast dtype, as in
    ``linear_token_logprobs``.

    Args:
        policy_hidden: ``(..., T, D)`` final hidden states of ``[prompt, y]`` at the response
            positions, or None to skip that stream.
        pos_hidden: ``(..., T, D)`` hidden states of ``[prompt, r+, y]``.
        neg_hidden: ``(..., T, D)`` hidden states of ``[prompt, r-, y]``. All hidden states
            float16/bfloat16/float32 (float64 on the torch backend), the dtype of ``weight``.
        weight: ``(V, D)`` LM-head weight.
        targets: ``(..., T)`` integer response tokens ``y_t``.
        advantages: ``(...)`` per sequence, or ``(..., T)`` per token; float.
        lam, eps_w: weighting strength in ``[0, 1]`` and clip half-width in ``[0, 1)``.
        temperature: finite, > 0; logits are divided by it.
        mask: ``(..., T)`` bool, integer or float (TRL / verl 0/1 masks); nonzero where the token
            counts. Tokens equal to ``ignore_index`` never count.
        bias: ``(V,)`` float or None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        validate: check the target range with one host sync (raises ``ValueError``);
            ``None`` (default) does so only for CPU tensors and never under ``torch.compile``.
            Without the check nothing syncs and an out-of-range target (where the mask counts)
            gives NaN log-probs and is treated as masked (weight 1, advantage 0).

    Returns:
        ``ContrastiveLogprobs(policy, pos, neg, weights, advantages)``, each ``(..., T)`` float32
        (float64 on the torch backend for float64 inputs): log-probs
        ``log softmax((W h + b) / T)[y_t]`` per stream, the clipped weights
        ``c_t = clip(exp(sign(A) * (pos - neg)), 1 - eps_w, 1 + eps_w)`` and
        ``A_t = A * (1 + lam * (c_t - 1))``. Masked tokens get log-probs 0, weight 1 and
        advantage 0. Each stream's log-probs are bit-identical to ``linear_token_logprobs`` of
        that stream on the same backend (same tiles, same reduction order).
    """
    policy_hidden, pos_hidden, neg_hidden, weight, bias = _autocast.cast_inputs(
        policy_hidden, pos_hidden, neg_hidden, weight, bias
    )
    lam, eps_w, temperature, mask = check_contrastive_options(targets, advantages, mask, lam, eps_w, temperature)
    token_shape = tuple(targets.shape)
    streams = {"policy_hidden": policy_hidden, "pos_hidden": pos_hidden, "neg_hidden": neg_hidden}
    vocab = None
    for name, hidden in streams.items():
        if hidden is None and name == "policy_hidden":
            continue
        vocab = check_head(name, hidden, weight, bias)
        _validate.check_shape(name, hidden, (*token_shape, weight.shape[1]), "targets.shape + (D,)")
    _validate.check_same_device(targets=targets, advantages=advantages, mask=mask, weight=weight, bias=bias, **streams)
    targets, bad = _validate.screen_targets(targets, vocab, ignore_index, validate, mask)
    tensors = [policy_hidden, pos_hidden, neg_hidden, weight, bias, advantages]
    chosen = _dispatch.resolve(OP, backend, ORDER, tensors, dtypes=DTYPES)

    dtype = accumulation_dtype(*tensors) if chosen == "torch" else torch.float32
    flat_targets, a_tok, sign, keep = prepare_contrastive_inputs(targets, advantages, mask, ignore_index, dtype)

    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    forward = _forward_impl(chosen)
    with _autocast.disabled(weight.device.type):
        outs = forward(
            flat_rows(policy_hidden), flat_rows(pos_hidden), flat_rows(neg_hidden), w, b, flat_targets, a_tok, sign,
            keep, lam, eps_w, temperature, int(ignore_index),
        )  # fmt: skip
    return shaped_results(outs, token_shape, bad)
