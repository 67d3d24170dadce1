"""The group pass: per-response-token log-probs from packed shared-prefix forwards.

No-grad pass (old policy and teachers): :func:`group_logprobs` packs micro-batches of groups as
``prompt | r+ | r- | 3G responses`` and runs one forward per micro-batch; the LM head runs only at
the positions that predict response tokens. Update pass: :func:`policy_logprobs` packs
``prompt | G responses`` per group and keeps the graph, so the prompt is encoded once per group and
its gradient collects every response's.

For response ``n``, token ``t`` and context ``c``::

    logp_c[n, t] = log softmax(W h_c(n, t) / T)[y_{n,t}]

where ``h_c(n, t)`` is the final hidden state (after the model's last norm) of the packed position
that predicts ``y_{n,t}``. Padded entries are 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cepo.hf_attention import packed_forward
from cepo.packing import CONTEXTS, Group, PackedGroups, pack_groups
from cepo_kernels.linear_token_logprobs import linear_token_logprobs

IGNORE = -100


# The call site is switchable: set to a function with linear_token_logprobs' signature, or None for the default.
LOGPROB_FN: Callable[..., torch.Tensor] | None = None


@dataclass
class GroupLogprobs:
    """Per-response-token log-probs, ``(N, L)`` each, responses in input order (group by group).

    ``policy``: old policy, ``[prompt, response]``; ``pos``: ``[prompt, r+, response]``; ``neg``:
    ``[prompt, r-, response]``; ``mask``: True on real response tokens (log-probs 0 elsewhere).
    """

    policy: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    mask: torch.Tensor


def _lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("model: has no output embeddings (LM head)")
    return head.weight, getattr(head, "bias", None)


def packed_response_logprobs(
    model: torch.nn.Module,
    packed: PackedGroups,
    *,
    contexts: Sequence[str] | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    logprob_fn: Callable[..., torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One packed forward; ``{context: (N, L) log-probs}`` for the requested contexts.

    The LM head (``logprob_fn``, default :data:`LOGPROB_FN` or ``linear_token_logprobs``) runs once
    over the hidden states gathered at every response-predicting position of all contexts.
    Differentiable when grad is enabled.
    """
    contexts = tuple(contexts or packed.contexts)
    fn = logprob_fn or LOGPROB_FN or linear_token_logprobs
    device = next(model.parameters()).device
    table = packed.table.to(device) if packed.table.input_ids.device != device else packed.table
    hidden = packed_forward(model, table, backend=backend)  # (R, T, hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = packed.targets(IGNORE).to(device)
    weight, bias = _lm_head(model)
    sel_idx, sel_tgt, where = [], [], []
    for ctx in contexts:
        idx = packed.predict_index(ctx).to(device)
        keep = (idx >= 0) & (targets != IGNORE)
        sel_idx.append(idx[keep])
        sel_tgt.append(targets[keep])
        where.append(keep)
    rows = flat.index_select(0, torch.cat(sel_idx))
    logp = fn(rows, weight, torch.cat(sel_tgt), temperature=temperature, bias=bias, ignore_index=IGNORE)
    out, offset = {}, 0
    for ctx, keep in zip(contexts, where):
        n = int(keep.sum())
        full = torch.zeros(keep.shape, dtype=logp.dtype, device=device)
        out[ctx] = full.masked_scatter(keep, logp[offset : offset + n])
        offset += n
    return out


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]))


def group_logprobs(
    model: torch.nn.Module,
    groups: Sequence[Group],
    *,
    groups_per_micro_batch: int = 1,
    max_row_len: int | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    pad_to_multiple: int = 1,
    logprob_fn: Callable[..., torch.Tensor] | None = None,
) -> GroupLogprobs:
    """No-grad old-policy, ``r+`` and ``r-`` log-probs of every response token.

    One packed forward per micro-batch of ``groups_per_micro_batch`` groups (``max_row_len`` caps
    a packed row; several groups may share a row). Returns :class:`GroupLogprobs`, float32 (float64
    for a float64 model).
    """
    parts: list[dict[str, torch.Tensor]] = []
    masks: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(groups), groups_per_micro_batch):
            packed = pack_groups(
                groups[i : i + groups_per_micro_batch],
                contexts=CONTEXTS,
                max_row_len=max_row_len,
                pad_to_multiple=pad_to_multiple,
            )
            parts.append(
                packed_response_logprobs(model, packed, temperature=temperature, backend=backend, logprob_fn=logprob_fn)
            )
            masks.append(packed.mask())
    width = max(m.shape[1] for m in masks)
    cat = {c: torch.cat([_pad_cols(p[c], width) for p in parts]) for c in CONTEXTS}
    mask = torch.cat([_pad_cols(m.to(cat["policy"].device), width) for m in masks])
    return GroupLogprobs(cat["policy"], cat["pos"], cat["neg"], mask)


def policy_logprobs(
    model: torch.nn.Module,
    groups: Sequence[Group],
    *,
    max_row_len: int | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    pad_to_multiple: int = 1,
    logprob_fn: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-enabled update pass: ``(logp (N, L), mask (N, L))`` of the responses under the policy,
    with each group's prompt encoded once and shared by its G responses (one packed forward)."""
    packed = pack_groups(groups, contexts=("policy",), max_row_len=max_row_len, pad_to_multiple=pad_to_multiple)
    out = packed_response_logprobs(
        model, packed, contexts=("policy",), temperature=temperature, backend=backend, logprob_fn=logprob_fn
    )
    return out["policy"], packed.mask().to(out["policy"].device)
