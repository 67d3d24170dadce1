"""``token_logprobs``: per-token log-probs (and entropy) from logits, differentiable.

Backends: ``triton`` (GPU; CPU under ``TRITON_INTERPRET=1``), ``torch`` (reference,
chunked), and ``cuda`` where the compiled extension is built.
"""

from __future__ import annotations

import torch

from cepo_kernels import _dispatch, _validate
from cepo_kernels.reference import token_logprobs as ref

OP = "token_logprobs"
# Triton first: the cuda backend has not yet been measured faster on a GPU (docs/cuda_extension.md).
ORDER = ("triton", "cuda", "torch")
DTYPES = {"torch": _validate.FLOAT_DTYPES}


def _impl(backend: str):
    """(forward, backward) launchers of ``backend``, same signatures as the reference."""
    if backend == "triton":
        from cepo_kernels.triton import token_logprobs as tri

        return tri.token_logprobs_fwd, tri.token_logprobs_bwd
    if backend == "cuda":
        from cepo_kernels.cuda import ops

        return ops.token_logprobs_fwd, ops.token_logprobs_bwd
    return ref.token_logprobs_forward, ref.token_logprobs_backward


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd over 2-D logits; the backend chosen for the forward also runs the backward."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, want_entropy, backend):
        fwd, _ = _impl(backend)
        logp, entropy, lse = fwd(logits, targets, temperature, ignore_index, want_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy if want_entropy else None)
        ctx.cfg = (temperature, ignore_index, backend)
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend = ctx.cfg
        _, bwd = _impl(backend)
        grad = bwd(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index)
        return grad, None, None, None, None, None


def check_targets_shape(targets: torch.Tensor, logits: torch.Tensor) -> None:
    """``targets`` must be ``logits.shape[:-1]`` (one id per row); ``(..., K)`` is handled before."""
    lead = tuple(logits.shape[:-1])
    if tuple(targets.shape) != lead:
        hint = (
            f"; one id per row in another shape: pass targets.reshape({lead})"
            if targets.numel() == logits.shape[:-1].numel()
            else ""
        )
        raise ValueError(
            f"targets: expected shape {lead} (logits.shape[:-1]) or {lead + ('K',)} (K ids per row), "
            f"got {tuple(targets.shape)}{hint}"
        )


def _k_columns(logits, targets, temperature, ignore_index, return_entropy, backend, validate):
    """``targets (..., K)``: the log-probs of K ids per row of ``logits (..., V)``, shape ``(..., K)``.
    K = 1 is a squeeze; K > 1 runs the op on a ``(N, K, V)`` view that repeats each row (stride 0;
    the triton backend reads it in place, the others copy it)."""
    k = targets.shape[-1]
    kw = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy, backend=backend,
              validate=validate)  # fmt: skip
    if k == 1:
        out = token_logprobs(logits, targets[..., 0], **kw)
        return tuple(o.unsqueeze(-1) for o in out) if return_entropy else out.unsqueeze(-1)
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    out = token_logprobs(rows.unsqueeze(1).expand(rows.shape[0], k, vocab), targets.reshape(-1, k), **kw)
    return tuple(o.view(targets.shape) for o in out) if return_entropy else out.view(targets.shape)


def _viewable_2d(x: torch.Tensor) -> bool:
    """Whether ``x (B, T, V)`` flattens to ``(B T, V)`` with one row stride (no copy)."""
    return x.shape[0] <= 1 or x.shape[1] <= 1 or x.stride(0) == x.shape[1] * x.stride(1)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token, ``log softmax(logits / temperature)[target]``.

    Args:
        logits: ``(..., V)`` float16/bfloat16/float32 (float64 on the torch backend). ``-inf``
            entries are legal (a masked vocabulary); ``+inf`` and NaN are not.
        targets: ``(...)`` integer token ids in ``[0, V)``, or ``ignore_index``: one per row of
            logits. Or ``(..., K)``: K ids per row (TRL's ``index`` of shape ``(..., K)``; K = 1
            costs nothing extra; K > 1 reads each row K times, and its backward holds a
            ``(..., K, V)`` gradient before summing it). Labels of another shape with one id per
            row (verl passes ``(1, N)`` with ``(N, V)`` logits) are an error: reshape them to
            ``logits.shape[:-1]`` first.
        temperature: finite, > 0; the logits are divided by it before the softmax.
        ignore_index: targets equal to it give log-prob 0, entropy 0 and zero gradient.
        return_entropy: also return ``H = -sum_j p_j log p_j`` of the same distribution.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        validate: check the target range with one host sync (raises ``ValueError``);
            ``None`` (default) does so only for CPU tensors and never under ``torch.compile``.
            Without the check nothing syncs and an out-of-range target gives a NaN log-prob
            (and entropy) with zero gradient instead of an error.

    Returns:
        ``logp`` of the targets' shape, float32 (float64 for float64 logits), and ``entropy`` of
        the same shape and dtype if ``return_entropy``. A target whose logit is ``-inf`` gets
        ``-inf``. Differentiable with respect to ``logits`` through both outputs:
        ``dlogp/dz_j = 1[j == y] - p_j``, ``dH/dz_j = -p_j (z_j - sum_k p_k z_k)``, ``z = logits / T``.

    Memory: O(N) extra besides the gradient; no ``(N, V)`` fp32 temporary is made.
    """
    _validate.check_float("logits", logits, min_dim=1)
    _validate.check_int("targets", targets)
    if targets.dim() == logits.dim() and targets.shape[:-1] == logits.shape[:-1]:
        return _k_columns(logits, targets, temperature, ignore_index, return_entropy, backend, validate)
    check_targets_shape(targets, logits)
    _validate.check_same_device(logits=logits, targets=targets)
    temperature = _validate.check_temperature(temperature)
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits: expected a vocabulary dimension of at least 1, got 0")
    targets, bad = _validate.screen_targets(targets, vocab, ignore_index, validate)
    chosen = _dispatch.resolve(OP, backend, ORDER, [logits], dtypes=DTYPES)

    lead = logits.shape[:-1]
    if chosen == "triton" and logits.dim() == 3 and logits.stride(-1) == 1 and not _viewable_2d(logits):
        logits2d = logits  # e.g. logits[:, :-1]: the kernels take an outer and a row stride, no copy
    else:
        logits2d = logits.reshape(-1, vocab)
        if logits2d.stride(-1) != 1:
            logits2d = logits2d.contiguous()
    targets1d = targets.reshape(-1)
    out = TokenLogprobsFunction.apply(logits2d, targets1d, temperature, int(ignore_index), return_entropy, chosen)
    if return_entropy:
        return _validate.mark_bad(out[0].view(lead), bad), _validate.mark_bad(out[1].view(lead), bad)
    return _validate.mark_bad(out.view(lead), bad)
