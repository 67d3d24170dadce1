"""``group_advantages``: GRPO's group-normalised rewards."""

from __future__ import annotations

import math

import torch

from cepo_kernels.reference.group_advantages import group_advantages_reference


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO advantages: each reward centred on its group's mean, optionally scaled.

    Args:
        rewards: ``(B,)`` float (or integer) rewards, groups contiguous: rollouts
            ``g * group_size ... (g + 1) * group_size - 1`` answer the same prompt.
        group_size: ``G >= 1`` dividing ``B`` (``G >= 2`` when ``scale_by_std``).
        eps: added to the standard deviation, finite and >= 0.
        scale_by_std: divide by the group's unbiased standard deviation + ``eps``.

    Returns:
        ``(B,)`` float32 (float64 for float64 rewards):
        ``(r_i - mean_g) / (std_g + eps)`` or ``r_i - mean_g``. A group whose rewards are all
        equal gets 0.
    """
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape (B,), got {tuple(rewards.shape)}")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise ValueError(f"rewards: expected a real float or integer tensor, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch of {rewards.numel()} rewards")
    if scale_by_std and group_size < 2:
        raise ValueError("group_size: expected >= 2 when scale_by_std=True (one sample has no std)")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    return group_advantages_reference(rewards, group_size, float(eps), scale_by_std)
