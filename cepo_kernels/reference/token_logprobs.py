"""Reference (plain PyTorch) token log-probs and entropy over logits, chunked over rows.

For a row of logits ``x`` (length ``V``), temperature ``T`` and target ``y``::

    z     = x / T
    lse   = log sum_j exp(z_j)
    logp  = z_y - lse
    H     = -sum_j p_j log p_j = log(sum_j exp(z_j - m)) - sum_j p_j (z_j - m),  m = max_j z_j

Backward, for upstream gradients ``g`` (of ``logp``) and ``h`` (of ``H``)::

    dL/dx_j = (g * (1[j == y] - p_j) - h * p_j * (z_j - sum_k p_k z_k)) / T

where ``sum_k p_k z_k = lse - H`` and terms with ``p_j == 0`` are 0 (so ``-inf`` logits
get zero gradient). Ignored rows (target == ignore_index) give ``logp = H = 0`` and zero
gradient. A row that is entirely ``-inf`` gives ``logp = -inf``, ``H = 0`` and zero gradient.

Rows are processed ``chunk_rows`` at a time, so at most a few ``chunk_rows x V`` fp32
buffers exist at once: a full fp32 copy of a large ``(N, V)`` tensor is never made.
The math runs in fp32, or fp64 when the logits are fp64.
"""

from __future__ import annotations

import torch

from cepo_kernels.reference.contrastive_advantage import accumulation_dtype

CHUNK_ELEMENTS = 1 << 22  # ~16 MiB of fp32 per temporary


def chunk_rows_for(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def scaled(x: torch.Tensor, acc: torch.dtype, temperature: float) -> torch.Tensor:
    """``x / temperature`` in the accumulation dtype, as a fresh tensor."""
    z = x.to(acc, copy=True)
    return z if temperature == 1.0 else z.div_(temperature)


def row_stats(z: torch.Tensor, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``lse`` and (optionally) entropy of each row of scaled logits ``z`` (rows, V)."""
    if not want_entropy:
        return torch.logsumexp(z, dim=-1), None  # -inf for an all -inf row
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # all -inf rows: no shift
    e = torch.exp(z - m)
    s = e.sum(-1)
    lse = m.squeeze(-1) + torch.log(s)
    zs = z - m
    weighted = torch.where(e > 0, e * zs, torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1)
    entropy = torch.where(s > 0, torch.log(s) - weighted / s, torch.zeros_like(s))
    return lse, entropy


def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward over 2-D ``logits (N, V)`` and ``targets (N,)``.

    Returns ``(logp (N,), entropy (N,) or None, lse (N,))`` in fp32 (fp64 for fp64 logits);
    ``lse`` is what the backward needs.
    """
    n, v = logits.shape
    acc = accumulation_dtype(logits)
    logp = torch.zeros(n, dtype=acc, device=logits.device)
    lse_all = torch.zeros(n, dtype=acc, device=logits.device)
    entropy = torch.zeros(n, dtype=acc, device=logits.device) if want_entropy else None
    step = chunk_rows_for(v)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        tgt = targets[rows].long()
        keep = tgt != ignore_index
        z = scaled(logits[rows], acc, temperature)
        lse, ent = row_stats(z, want_entropy)
        z_t = z.gather(-1, torch.where(keep, tgt, 0).unsqueeze(-1)).squeeze(-1)
        lp = torch.where(torch.isneginf(lse), torch.full_like(lse, float("-inf")), z_t - lse)
        zero = torch.zeros((), dtype=acc, device=logits.device)
        logp[rows] = torch.where(keep, lp, zero)
        lse_all[rows] = torch.where(keep, lse, zero)
        if want_entropy:
            entropy[rows] = torch.where(keep, ent, zero)
    return logp, entropy, lse_all


def token_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient with respect to 2-D ``logits (N, V)``, in the logits' dtype (formula above)."""
    n, v = logits.shape
    acc = accumulation_dtype(logits)
    grad = torch.empty_like(logits)
    step = chunk_rows_for(v)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        tgt = targets[rows].long()
        row_lse = lse[rows].unsqueeze(-1)
        live = (tgt != ignore_index) & ~torch.isneginf(lse[rows])
        z = scaled(logits[rows], acc, temperature)
        p = torch.exp(z - torch.where(torch.isneginf(row_lse), torch.zeros_like(row_lse), row_lse))
        g = torch.zeros_like(z)
        if grad_logp is not None:
            gl = grad_logp[rows].to(acc).unsqueeze(-1)
            g = -gl * p
            g.scatter_add_(-1, torch.where(live, tgt, 0).unsqueeze(-1), gl)
        if grad_entropy is not None:
            mean_z = row_lse - entropy[rows].unsqueeze(-1)
            term = torch.where(p > 0, p * (z - mean_z), torch.zeros((), dtype=acc, device=z.device))
            g = g - grad_entropy[rows].to(acc).unsqueeze(-1) * term
        g = torch.where(live.unsqueeze(-1), g / temperature, torch.zeros((), dtype=acc, device=z.device))
        grad[rows] = g.to(logits.dtype)
    return grad
