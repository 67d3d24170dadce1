"""cepo_kernels: fused log-prob kernels for CEPO / RLSD / GRPO fine-tuning.

Public API (v1), each with ``backend="auto" | "cuda" | "triton" | "torch"``:

- ``token_logprobs(logits, targets, ...)``: per-token log-probs (and entropy), differentiable.
- ``contrastive_logprobs(policy_logits, pos_logits, neg_logits, targets, advantages, ...)``:
  three streams of log-probs and the CEPO advantages in one pass over each logits row.
- ``contrastive_advantage(advantages, pos_logprobs, neg_logprobs, ...)``: the weighting alone.
- ``group_advantages(rewards, group_size, ...)``: GRPO's group-normalised advantages.
- ``linear_token_logprobs(hidden, weight, targets, ...)``: log-probs (and entropy) from hidden
  states and the LM-head weight, no N x V logits; differentiable (hidden, weight, bias).
- ``linear_contrastive_logprobs(policy_hidden, pos_hidden, neg_hidden, weight, targets, advantages, ...)``:
  three contexts + CEPO weighting from hidden states, one read of each weight tile.
- ``tree_attention(q, k, v, segments, ...)``: shared-prefix (tree) attention over a packed row
  whose segments point to their parents, so a group's prompt is encoded once.

``python -m cepo_kernels.info`` prints versions and which backend each op would use.
"""

from cepo_kernels.contrastive_advantage import contrastive_advantage
from cepo_kernels.contrastive_logprobs import ContrastiveLogprobs, contrastive_logprobs
from cepo_kernels.group_advantages import group_advantages
from cepo_kernels.linear_contrastive_logprobs import linear_contrastive_logprobs
from cepo_kernels.linear_token_logprobs import linear_token_logprobs
from cepo_kernels.token_logprobs import token_logprobs
from cepo_kernels.tree_attention import TreeLayout, tree_attention, tree_layout

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLogprobs",
    "contrastive_advantage",
    "contrastive_logprobs",
    "group_advantages",
    "linear_contrastive_logprobs",
    "linear_token_logprobs",
    "token_logprobs",
    "TreeLayout",
    "tree_attention",
    "tree_layout",
]
