"""Advantages for GRPO, RLSD and CEPO: pure functions on tensors and strings.

GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)`` over the ``G`` rollouts of a prompt
(:func:`cepo_kernels.group_advantages`).

RLSD and CEPO reweight each response token by how much a *teacher context* changes its
probability (:func:`cepo_kernels.contrastive_advantage`)::

    delta_t = log P(y_t | prompt, r+, y<t) - log P(y_t | neg context)
    c_t     = clip(exp(sign(A) * delta_t), 1 - eps_w, 1 + eps_w)
    A_t     = A * (1 + lam * (c_t - 1))

- RLSD: ``r+`` is the ground truth; the negative is the old policy itself (no teacher context).
- CEPO: ``r+`` is the ground truth; ``r-`` is the final answer of the group's lowest-scoring
  rejected rollout (reward below ``reject_threshold``). Fallbacks, per group:
  no rejected rollout -> ``no_rejected="rlsd"`` (negative = old policy, as the paper states) or
  ``"grpo"`` (``A_t = A``, as the reference code does); the lowest-scoring rejected rollout has no
  extractable answer -> the next-lowest rejected rollout that has one; none has one -> RLSD.

``lam`` comes from the global step (:func:`lam_at`), so it is right after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import cepo_kernels
from cepo.reward import extract_answer


def lam_at(step: int, lam0: float, schedule: str, decay_steps: int) -> float:
    """``lam`` at 1-based RL ``step``.

    With ``T = decay_steps > 0`` and ``p = (step - 1) / T``: linear ``lam0 * (1 - p)``, cosine
    ``lam0 * (1 + cos(pi p)) / 2``, constant ``lam0``, for ``step <= T``; 0 from step ``T + 1`` on.
    ``T = 0`` keeps ``lam0`` for every step.
    """
    if step < 1:
        raise ValueError(f"step: expected >= 1, got {step}")
    if decay_steps == 0:
        return float(lam0)
    if step > decay_steps:
        return 0.0
    p = (step - 1) / decay_steps
    if schedule == "linear":
        return float(lam0 * (1.0 - p))
    if schedule == "cosine":
        return float(lam0 * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "constant":
        return float(lam0)
    raise ValueError(f"lam_schedule: expected 'linear', 'cosine' or 'constant', got {schedule!r}")


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True) -> torch.Tensor:
    """``(B,)`` float32 group-normalised advantages of ``(B,)`` rewards (groups contiguous)."""
    return cepo_kernels.group_advantages(rewards.float(), group_size, scale_by_std=scale_by_std)


@dataclass
class NegativeChoice:
    """Per group: the rollout whose answer is ``r-`` (or None) and why."""

    index: int | None  # rollout index within the batch, None when no r- is used
    answer: str | None  # the extracted r- answer
    reason: str  # "ok", "no_rejected" or "no_answer"


def select_negatives(
    rewards: list[float], responses: list[str], group_size: int, threshold: float
) -> list[NegativeChoice]:
    """Choose ``r-`` for each group of ``group_size`` consecutive rollouts.

    Rejected rollouts are those with reward ``< threshold``; they are tried from the lowest
    reward up (ties: the earliest), and the first with an extractable answer
    (:func:`cepo.reward.extract_answer`, which also reads answers without ``\\boxed{}``) is taken.
    """
    out = []
    for g in range(len(rewards) // group_size):
        idx = range(g * group_size, (g + 1) * group_size)
        rejected = sorted((i for i in idx if rewards[i] < threshold), key=lambda i: (rewards[i], i))
        if not rejected:
            out.append(NegativeChoice(None, None, "no_rejected"))
            continue
        for i in rejected:
            answer, _ = extract_answer(responses[i])
            if answer is not None:
                out.append(NegativeChoice(i, answer, "ok"))
                break
        else:
            out.append(NegativeChoice(None, None, "no_answer"))
    return out


def contrastive_token_advantages(
    seq_advantages: torch.Tensor,
    pos_logprobs: torch.Tensor,
    neg_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    lam: float,
    eps_w: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_t, c_t)``, both ``(B, T)`` float32 (float64 for float64 log-probs), from ``(B,)``
    advantages and ``(B, T)`` log-probs.

    Rows where ``pos == neg`` (e.g. the GRPO fallback) get ``A_t = A`` exactly.
    """
    acc = torch.float64 if pos_logprobs.dtype == torch.float64 else torch.float32
    return cepo_kernels.contrastive_advantage(
        seq_advantages.to(acc),
        pos_logprobs.to(acc),
        neg_logprobs.to(acc),
        lam=lam,
        eps_w=eps_w,
        mask=mask,
        return_weights=True,
        backend=backend,
    )


def delta_diagnostics(
    seq_advantages: torch.Tensor,
    rewards: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    eps_w: float,
    threshold: float,
) -> dict[str, float]:
    """CEPO diagnostics: mean/std of ``delta`` on correct and wrong rollouts, the fraction of
    tokens whose ``delta`` has the wrong sign (``sign(delta) != sign(A)``, over tokens with
    ``A != 0``) and the fraction of weights at a clip bound."""
    delta = (pos - neg).float()
    out = {}
    correct = (rewards >= threshold)[:, None] & mask
    wrong = (rewards < threshold)[:, None] & mask
    for name, sel in (("correct", correct), ("wrong", wrong)):
        d = delta[sel]
        d = d[torch.isfinite(d)]
        out[f"cepo/delta_mean_{name}"] = d.mean().item() if d.numel() else float("nan")
        out[f"cepo/delta_std_{name}"] = d.std().item() if d.numel() > 1 else float("nan")
    signed = mask & (seq_advantages != 0)[:, None]
    if signed.any():
        s = torch.sign(seq_advantages)[:, None].expand_as(delta)
        out["cepo/wrong_sign_frac"] = ((torch.sign(delta) * s < 0) & signed).sum().item() / signed.sum().item()
    else:
        out["cepo/wrong_sign_frac"] = float("nan")
    if mask.any() and eps_w > 0:
        at_bound = ((weights - 1).abs() >= eps_w * (1 - 1e-6)) & mask
        out["cepo/clipped_weight_frac"] = at_bound.sum().item() / mask.sum().item()
    return out
