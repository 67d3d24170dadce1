"""cepo_kernels: fused log-prob kernels for CEPO / RLSD / GRPO fine-tuning.

Public API (v1), each with ``backend="auto" | "cuda" | "triton" | "torch"``:

- ``token_logprobs(logits, targets, ...)``: per-token log-probs (and entropy), differentiable.
- ``contrastive_logprobs(policy_logits, pos_logits, neg_logits, targets, advantages, ...)``:
  three streams of log-probs and the CEPO advantages in one pass over each logits row.
- ``contrastive_advantage(advantages, pos_logprobs, neg_logprobs, ...)``: the weighting alone.
- ``group_advantages(rewards, group_size, ...)``: GRPO's group-normalised advantages.

``python -m cepo_kernels.info`` prints versions and which backend each op would use.
"""

from cepo_kernels.contrastive_advantage import contrastive_advantage
from cepo_kernels.contrastive_logprobs import ContrastiveLogprobs, contrastive_logprobs
from cepo_kernels.group_advantages import group_advantages
from cepo_kernels.token_logprobs import token_logprobs

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLogprobs",
    "contrastive_advantage",
    "contrastive_logprobs",
    "group_advantages",
    "token_logprobs",
]
