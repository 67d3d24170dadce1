"""``linear_token_logprobs``: per-token log-probs (and entropy) straight from the final hidden
states and the LM-head weight, never materializing the ``N x V`` logits. Differentiable with
respect to the hidden states, the weight and the bias.

Backends: ``triton`` (GPU; CPU under ``TRITON_INTERPRET=1``) and ``torch`` (the reference,
chunked over rows and vocabulary). There is no ``cuda`` backend for this op.
"""

from __future__ import annotations

import torch

from cepo_kernels import _autocast, _dispatch, _validate
from cepo_kernels.reference import linear_logprobs as ref

OP = "linear_token_logprobs"
ORDER = ("triton", "torch")
DTYPES = {"torch": _validate.FLOAT_DTYPES}


def _impl(backend: str):
    """(forward, backward) launchers of ``backend``, same signatures as the reference."""
    if backend == "triton":
        from cepo_kernels.triton import linear_logprobs as tri

        return tri.linear_logprobs_fwd, tri.linear_logprobs_bwd
    return ref.linear_logprobs_forward, ref.linear_logprobs_backward


def check_head(name: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Checks shared by the hidden-state ops: ``hidden (..., D)``, ``weight (V, D)`` of the same
    dtype, ``bias (V,)`` or None. Returns ``V``."""
    _validate.check_float(name, hidden, min_dim=1)
    _validate.check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, D), got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"weight: expected shape (V, {hidden.shape[-1]}) to match {name}.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: expected the same dtype as weight ({weight.dtype}), got {hidden.dtype}")
    if vocab == 0:
        raise ValueError("weight: expected a vocabulary dimension of at least 1, got shape (0, D)")
    if bias is not None:
        _validate.check_float("bias", bias)
        _validate.check_shape("bias", bias, (vocab,), "one entry per vocabulary row of weight")
    return vocab


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` as a 2-D ``(N, D)`` view with a contiguous last dim."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """Autograd over ``hidden (N, D)``, ``weight (V, D)`` and ``bias (V,)``; the backend chosen
    for the forward also runs the backward, which recomputes the logits block by block. Both run
    with autocast off (the front door casts the inputs once, see ``cepo_kernels/_autocast.py``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, want_entropy, backend):
        fwd, _ = _impl(backend)
        with _autocast.disabled(hidden.device.type):
            logp, entropy, lse = fwd(hidden, weight, bias, targets, temperature, ignore_index, want_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if want_entropy else None)
        ctx.cfg = (temperature, ignore_index, backend)
        ctx.set_materialize_grads(False)
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend = ctx.cfg
        needs = tuple(ctx.needs_input_grad[:3])
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None, None
        _, bwd = _impl(backend)
        with _autocast.disabled(hidden.device.type):  # backward() may be called inside autocast
            dh, dw, db = bwd(
                hidden, weight, bias, targets, lse, entropy,
                grad_logp.contiguous() if grad_logp is not None else None,
                grad_entropy.contiguous() if grad_entropy is not None else None,
                temperature, ignore_index, needs,
            )  # fmt: skip
        return dh, dw, db, None, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under the LM head, without materializing logits.

    Computes, per token (row ``h`` of ``hidden``), ``z = (weight @ h + bias) / temperature`` and
    ``logp = z[target] - logsumexp(z)``, with the logits accumulated in fp32 from the input
    dtype (no rounding of logits to bf16, unlike an eager bf16 matmul).

    Args:
        hidden: ``(..., D)`` final hidden states, float16/bfloat16/float32 (float64 on the torch
            backend). Must be finite.
        weight: ``(V, D)`` LM-head weight, same dtype as ``hidden``; may be the tied input
            embedding (its gradients then add to the embedding's).
        targets: ``(...)`` integer token ids in ``[0, V)``, or ``ignore_index``.
        temperature: finite, > 0.
        bias: ``(V,)`` float or None.
        ignore_index: targets equal to it give log-prob 0, entropy 0 and exactly zero gradient.
        return_entropy: also return ``H = -sum_j p_j log p_j`` of the same distribution.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        validate: check the target range with one host sync (raises ``ValueError``);
            ``None`` (default) does so only for CPU tensors and never under ``torch.compile``.
            Without the check nothing syncs and an out-of-range target gives a NaN log-prob
            (and entropy) with zero gradient instead of an error.

    Returns:
        ``logp`` of shape ``(...)``, float32 (float64 for float64 inputs), and ``entropy`` of the
        same shape and dtype if ``return_entropy``. Differentiable with respect to ``hidden``,
        ``weight`` and ``bias`` through both outputs, for any per-token upstream gradient:
        ``dL/dh = G @ W``, ``dL/dW = G^T @ hidden`` (fp32 accumulation), ``dL/db = sum_rows G``,
        where ``G = (g * (onehot(y) - p) - e * p * (z - (lse - H))) / T`` and ``g``, ``e`` are the
        upstream gradients of ``logp`` and ``H``.

    Autocast: inside ``torch.autocast`` the float inputs (not float64) are first cast to the
    autocast dtype, as ``F.linear`` would cast them, and the forward and the backward both run on
    those rounded copies with autocast off; gradients of fp32 leaves are the gradients of their
    rounded copies (cast back by autograd). Forward and backward always agree.

    Determinism: fixed block sizes and a fixed reduction order on both backends, so a row's
    log-prob is bit-identical whatever ``N`` is, whichever rows share the batch, and however
    often it runs (old-policy and update log-probs agree exactly on-policy).

    Memory: no ``(N, V)`` tensor is allocated in the forward; the triton backward keeps one
    ``(N, V_chunk)`` block of logits gradients at a time (``V_chunk`` sized to a fixed budget).
    """
    hidden, weight, bias = _autocast.cast_inputs(hidden, weight, bias)
    vocab = check_head("hidden", hidden, weight, bias)
    _validate.check_int("targets", targets)
    _validate.check_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    _validate.check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    temperature = _validate.check_temperature(temperature)
    targets, bad = _validate.screen_targets(targets, vocab, ignore_index, validate)
    chosen = _dispatch.resolve(OP, backend, ORDER, [hidden, weight, bias], dtypes=DTYPES)

    lead = hidden.shape[:-1]
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else (bias if bias.stride(-1) == 1 else bias.contiguous())
    out = LinearTokenLogprobsFunction.apply(
        _rows(hidden),
        w,
        b,
        targets.reshape(-1).contiguous(),
        temperature,
        int(ignore_index),
        bool(return_entropy),
        chosen,
    )
    if return_entropy:
        return _validate.mark_bad(out[0].view(lead), bad), _validate.mark_bad(out[1].view(lead), bad)
    return _validate.mark_bad(out.view(lead), bad)
