"""Reference for GRPO's group-normalised advantages (the only backend: the op is tiny)."""

from __future__ import annotations

import torch


def group_advantages_reference(rewards: torch.Tensor, group_size: int, eps: float, scale_by_std: bool) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` (unbiased std) or ``r - mean_g``, per contiguous group.

    ``rewards`` is ``(B,)`` with ``B % group_size == 0``; returns ``(B,)`` fp32 (fp64 for fp64).
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        scaled = centred / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
        centred = torch.where(centred == 0, torch.zeros_like(centred), scaled)  # equal rewards: 0, even with eps=0
    return centred.reshape(-1)
