"""Reference (plain PyTorch) log-probs straight from hidden states and the LM-head weight.

For a row ``h`` of hidden states (length ``D``), head weight ``W`` ``(V, D)``, optional bias
``b`` ``(V,)``, temperature ``T`` and target ``y``::

    z     = (W h + b) / T                       # logits of the row, never stored whole
    lse   = log sum_j exp(z_j)
    logp  = z_y - lse
    H     = -sum_j p_j log p_j = lse - sum_j p_j z_j,   p = softmax(z)

Backward, for upstream gradients ``g`` (of ``logp``) and ``e`` (of ``H``) per row::

    G_j      = dL/dz'_j = (g * (1[j == y] - p_j) - e * p_j * (z_j - (lse - H))) / T   # z' = W h + b
    dL/dh    = sum_j G_j W_j             (G @ W)
    dL/dW_j  = sum_rows G_j h            (G^T @ hidden, accumulated in fp32)
    dL/db_j  = sum_rows G_j

Ignored rows (``target == ignore_index``) give ``logp = H = 0`` and ``G = 0``, so exactly zero
gradient for that row's hidden state and no contribution to ``dW``/``db``.

Memory: the loop runs over vocabulary blocks of ``VOCAB_BLOCK`` columns (outer; each block of
the weight is converted to the accumulation dtype once) and row chunks of ``chunk_rows(V)`` rows
(inner; a multiple of ``ROW_BLOCK`` with ``rows x min(V, VOCAB_BLOCK)`` about ``ELEMENT_BUDGET``),
so the largest temporaries are a few ``rows x VOCAB_BLOCK`` logits blocks and the ``VOCAB_BLOCK x
D`` weight block: nothing of size ``N x V`` is ever made for a large vocabulary. Every op of a
chunk covers all its rows at once, so a small vocabulary (V ~ 100) runs a handful of large ops
instead of one Python iteration per 32 rows. The math runs in fp32 (fp64 when an input is fp64).

Batch invariance: every logits block is one matmul of a fixed shape, ``(rows, D) x (D,
VOCAB_BLOCK or the last partial block)`` with ``rows`` a function of ``V`` alone; the last row
chunk is zero-padded to ``rows``. CPU BLAS picks different kernels (and reduction orders) for
different row counts (a single row often goes through a matrix-vector path; a batched matmul
over many small blocks is threaded differently depending on the batch count), so without the
padding a row's log-prob would change with ``N``. With it, a row's result depends only on that
row, ``W``, ``b`` and ``T``, whatever ``N`` is and wherever the row sits (row-wise reductions and
elementwise ops do not depend on the other rows; tested).
"""

from __future__ import annotations

import torch

from cepo_kernels.reference.contrastive_advantage import accumulation_dtype, contrastive_weights_reference

ROW_BLOCK = 32  # row chunks are a multiple of this; fixed (never derived from N) for batch invariance
VOCAB_BLOCK = 4096  # vocabulary columns per logits block
ELEMENT_BUDGET = 1 << 18  # logits elements per (row chunk x vocabulary block): bounds the temporaries


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: a multiple of ``ROW_BLOCK`` with ``rows * min(V, VOCAB_BLOCK) <= ELEMENT_BUDGET``
    (at least ``ROW_BLOCK``). Depends on ``V`` only, never on ``N`` (batch invariance)."""
    width = max(1, min(vocab, VOCAB_BLOCK))
    return max(ROW_BLOCK, ELEMENT_BUDGET // width // ROW_BLOCK * ROW_BLOCK)


def _padded_rows(hidden: torch.Tensor, acc: torch.dtype, rows: int) -> torch.Tensor:
    """``hidden (N, D)`` in ``acc`` with zero rows appended up to a multiple of ``rows`` (no copy
    when it already is one, in ``acc`` and contiguous)."""
    n, d = hidden.shape
    n_pad = -(-n // rows) * rows
    if n_pad == n and hidden.dtype == acc and hidden.is_contiguous():
        return hidden
    out = torch.empty((n_pad, d), dtype=acc, device=hidden.device)
    out[:n] = hidden
    out[n:] = 0
    return out


def _padded_vec(x: torch.Tensor, n_pad: int, fill) -> torch.Tensor:
    out = torch.full((n_pad,), fill, dtype=x.dtype, device=x.device)
    out[: x.shape[0]] = x
    return out


def _vocab_blocks(vocab: int):
    for v0 in range(0, vocab, VOCAB_BLOCK):
        yield v0, min(vocab, v0 + VOCAB_BLOCK)


def _logits_block(h_blk, w_blk, b_blk, temperature):
    """``(h_blk @ w_blk.T + b_blk) / T`` in the accumulation dtype."""
    z = h_blk @ w_blk.T
    if b_blk is not None:
        z += b_blk
    if temperature != 1.0:
        z /= temperature
    return z


def _multi_stream_forward(
    hiddens: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """The forward for one or more hidden streams sharing ``weight``, ``targets``: each block
    of the weight is converted once and used for every stream. Each stream's result is
    computed with exactly the same operations as a single-stream call."""
    n = targets.shape[0]
    vocab = weight.shape[0]
    acc = accumulation_dtype(weight, bias, *hiddens)
    dev = weight.device
    tgt = targets.long()
    keep = tgt != ignore_index
    # per stream running state over vocabulary blocks: max m, sum s = sum exp(z - m),
    # a = sum exp(z - m) * (z - m) (entropy), and the target logit
    chunk = chunk_rows(vocab)
    padded = [_padded_rows(h, acc, chunk) for h in hiddens]
    n_pad = padded[0].shape[0]
    tgt_pad = _padded_vec(torch.where(keep, tgt, -1), n_pad, -1)
    states = [
        {
            "m": torch.full((n_pad,), float("-inf"), dtype=acc, device=dev),
            "s": torch.zeros(n_pad, dtype=acc, device=dev),
            "a": torch.zeros(n_pad, dtype=acc, device=dev),
            "zt": torch.zeros(n_pad, dtype=acc, device=dev),
        }
        for _ in hiddens
    ]
    zero = torch.zeros((), dtype=acc, device=dev)
    for v0, v1 in _vocab_blocks(vocab):
        w_blk = weight[v0:v1].to(acc)
        b_blk = bias[v0:v1].to(acc) if bias is not None else None
        for r0 in range(0, n_pad, chunk):
            rows = slice(r0, r0 + chunk)
            t_blk = tgt_pad[rows]
            here = (t_blk >= v0) & (t_blk < v1)
            col = torch.where(here, t_blk - v0, 0).unsqueeze(-1)
            for h_pad, st in zip(padded, states):
                z = _logits_block(h_pad[rows], w_blk, b_blk, temperature)
                st["zt"][rows] = torch.where(here, z.gather(-1, col).squeeze(-1), st["zt"][rows])
                m_old, s_old = st["m"][rows], st["s"][rows]
                m_new = torch.maximum(m_old, z.amax(-1))  # logits are finite: m_new is finite
                z.sub_(m_new.unsqueeze(-1))  # z - m, in place (CPU: fewer fresh buffers to fault in)
                scale = torch.exp(m_old - m_new)  # 0 on the first block (m_old = -inf)
                if want_entropy:
                    e = torch.exp(z)
                    carried = torch.where(s_old > 0, scale * (st["a"][rows] + s_old * (m_old - m_new)), zero)
                    st["a"][rows] = carried + (e * z).sum(-1)
                else:
                    e = z.exp_()
                st["s"][rows] = s_old * scale + e.sum(-1)
                st["m"][rows] = m_new
    results = []
    for st in states:
        m, s = st["m"][:n], st["s"][:n]
        lse = m + torch.log(s)
        logp = torch.where(keep, st["zt"][:n] - lse, zero)
        lse = torch.where(keep, lse, zero)
        entropy = None
        if want_entropy:
            entropy = torch.where(keep, torch.log(s) - st["a"][:n] / s, zero)
        results.append((logp, entropy, lse))
    return results


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward over ``hidden (N, D)``, ``weight (V, D)``, ``bias (V,)`` or None, ``targets (N,)``.

    Returns ``(logp, entropy or None, lse)``, each ``(N,)`` fp32 (fp64 for fp64 inputs); ``lse``
    (0 on ignored rows) is what the backward needs.
    """
    return _multi_stream_forward([hidden], weight, bias, targets, temperature, ignore_index, want_entropy)[0]


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(d hidden, d weight, d bias)`` (None where ``needs`` says not needed), each
    in its input's dtype, from the formula in the module docstring. ``dW`` and ``dh`` are
    accumulated in fp32 (fp64 for fp64 inputs) and rounded once at the end."""
    need_h, need_w, need_b = needs
    n, d = hidden.shape
    vocab = weight.shape[0]
    acc = accumulation_dtype(weight, bias, hidden)
    dev = hidden.device
    zero = torch.zeros((), dtype=acc, device=dev)
    chunk = chunk_rows(vocab)
    h_acc = _padded_rows(hidden, acc, chunk)  # padded rows are dead: zero gradient, no dW/db share
    n_pad = h_acc.shape[0]
    tgt = _padded_vec(targets.long(), n_pad, ignore_index)
    live = _padded_vec(targets.long() != ignore_index, n_pad, False)
    g = _padded_vec(grad_logp.to(acc), n_pad, 0) if grad_logp is not None else None
    e = _padded_vec(grad_entropy.to(acc), n_pad, 0) if grad_entropy is not None else None
    # dead rows (ignored or padding) get lse = +inf, so p = exp(z - lse) = 0 and their logits
    # gradient is exactly zero without a mask pass; mean_z = 0 there keeps e * p * (z - mean_z) at 0
    lse_live = _padded_vec(lse.to(acc), n_pad, 0)
    lse_safe = torch.where(live, lse_live, torch.full((), float("inf"), dtype=acc, device=dev))
    mean_z = torch.where(live, lse_live - _padded_vec(entropy.to(acc), n_pad, 0), zero) if e is not None else None
    dh = torch.zeros((n_pad, d), dtype=acc, device=dev) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    for v0, v1 in _vocab_blocks(vocab):
        w_blk = weight[v0:v1].to(acc)
        b_blk = bias[v0:v1].to(acc) if bias is not None else None
        dw_blk = torch.zeros((v1 - v0, d), dtype=acc, device=dev) if need_w else None
        for r0 in range(0, n_pad, chunk):
            rows = slice(r0, r0 + chunk)
            z = _logits_block(h_acc[rows], w_blk, b_blk, temperature)
            z_c = z - mean_z[rows].unsqueeze(-1) if e is not None else None  # z - (lse - H)
            p = z.sub_(lse_safe[rows].unsqueeze(-1)).exp_()  # in place: z is not needed any more
            ent_term = z_c.mul_(p).mul_(e[rows].unsqueeze(-1)) if e is not None else None  # e p (z - mean)
            if g is not None:
                g_row = g[rows].unsqueeze(-1)
                grad = p.mul_(-g_row)  # in place: p is not needed any more
                t_blk = tgt[rows]
                here = live[rows] & (t_blk >= v0) & (t_blk < v1)
                col = torch.where(here, t_blk - v0, 0).unsqueeze(-1)
                grad.scatter_add_(-1, col, torch.where(here.unsqueeze(-1), g_row, zero))
                if ent_term is not None:
                    grad -= ent_term
            else:
                grad = ent_term.neg_()
            if temperature != 1.0:
                grad.div_(temperature)
            if need_h:
                dh[rows] += grad @ w_blk
            if need_w:
                dw_blk += grad.T @ h_acc[rows]
            if need_b:
                db[v0:v1] += grad.sum(0)
        if need_w:
            dw[v0:v1] = dw_blk.to(weight.dtype)
    return (
        dh[:n].to(hidden.dtype) if need_h else None,
        dw,
        db.to(bias.dtype) if need_b else None,
    )


def linear_contrastive_logprobs_forward(
    policy_hidden: torch.Tensor | None,
    pos_hidden: torch.Tensor,
    neg_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    a_tok: torch.Tensor,
    sign: torch.Tensor,
    keep: torch.Tensor,
    lam: float,
    eps_w: float,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat inputs: hidden streams ``(N, D)``, ``targets``/``a_tok``/``sign``/``keep`` ``(N,)``
    with ``targets == ignore_index`` wherever ``keep`` is False.

    Returns ``(policy or None, pos, neg, weights, advantages)``, each ``(N,)`` fp32 (fp64 for
    fp64 inputs). Each stream's log-probs are bit-identical to ``linear_logprobs_forward`` on
    that stream alone."""
    hiddens = [h for h in (policy_hidden, pos_hidden, neg_hidden) if h is not None]
    outs = [o[0] for o in _multi_stream_forward(hiddens, weight, bias, targets, temperature, ignore_index, False)]
    policy = outs[0] if policy_hidden is not None else None
    pos, neg = outs[-2], outs[-1]
    weights, adv = contrastive_weights_reference(a_tok.to(pos.dtype), sign.to(pos.dtype), pos, neg, lam, eps_w, keep)
    return policy, pos, neg, weights, adv
