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
from enum import Enum

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


class Negative(str, Enum):
    """Which context is a group's negative (the ``neg`` stream of its responses)."""

    R_MINUS = "r-"  # [prompt, teacher_template(r-)]: CEPO
    POLICY = "policy"  # the old policy itself: RLSD, and CEPO's fallback
    R_PLUS = "r+"  # the positive context itself: delta = 0, A_t = A (CEPO with no_rejected="grpo")


def negative_contexts(
    algorithm: str, choices: list[NegativeChoice] | None, n_groups: int, no_rejected: str
) -> list[Negative]:
    """The negative of each of ``n_groups`` groups, decided once: RLSD's is always the policy;
    CEPO's is ``r-`` where :func:`select_negatives` found one, else the fallback of the module
    docstring (``no_rejected`` for groups without a rejected rollout, the policy for groups whose
    rejected rollouts have no extractable answer)."""
    if algorithm == "rlsd":
        return [Negative.POLICY] * n_groups
    if algorithm != "cepo":
        raise ValueError(f"algorithm: teacher contexts exist for 'rlsd' and 'cepo', not {algorithm!r}")
    if choices is None or len(choices) != n_groups:
        raise ValueError(f"choices: expected one NegativeChoice per group ({n_groups})")
    out = []
    for c in choices:
        if c.reason == "ok" and c.answer is not None:
            out.append(Negative.R_MINUS)
        elif c.reason == "no_rejected" and no_rejected == "grpo":
            out.append(Negative.R_PLUS)
        else:
            out.append(Negative.POLICY)
    return out


def choose_negatives(
    algorithm_cfg, lam: float, rewards: list[float], texts: list[str], group_size: int
) -> tuple[list[Negative] | None, list[NegativeChoice] | None]:
    """Per group, ``(negatives, choices)`` as a step of ``cepo train`` decides them: ``(None, None)``
    when no teacher pass runs (GRPO or ``lam == 0``); RLSD ``([POLICY, ...], None)``; CEPO the
    :func:`select_negatives` choices and :func:`negative_contexts` of them."""
    name = algorithm_cfg.name
    if lam <= 0 or name == "grpo":
        return None, None
    n_groups = len(rewards) // group_size
    choices = None
    if name == "cepo":
        choices = select_negatives(rewards, texts, group_size, algorithm_cfg.reject_threshold)
    return negative_contexts(name, choices, n_groups, algorithm_cfg.no_rejected), choices


def negative_stats(choices: list[NegativeChoice]) -> dict[str, float]:
    """``cepo/no_rejected_frac`` (groups without a rejected rollout) and ``cepo/no_answer_frac``
    (of the groups with one, those whose rejected rollouts have no extractable answer)."""
    with_rejected = sum(c.reason != "no_rejected" for c in choices)
    no_answer = sum(c.reason == "no_answer" for c in choices)
    return {
        "cepo/no_rejected_frac": sum(c.reason == "no_rejected" for c in choices) / len(choices),
        "cepo/no_answer_frac": no_answer / with_rejected if with_rejected else 0.0,
    }


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
