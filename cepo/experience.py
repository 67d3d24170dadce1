"""The experience phase: what one step's rollouts are worth, token by token.

:meth:`Experience.score` turns :class:`Rollouts` (with rewards) into :class:`Scored`:

1. ``A = group_advantages(rewards)`` per rollout (GRPO).
2. With teachers on (RLSD or CEPO and ``lam > 0``), the negative context of every group, decided
   once (:func:`cepo.advantages.negative_contexts`): ``r-`` (CEPO), the old policy (RLSD, and
   CEPO's fallback) or ``r+`` itself (CEPO with ``no_rejected=grpo``: ``A_t = A`` exactly).
3. One no-grad pass strategy (:mod:`cepo.scoring`, packed or padded, chosen at set-up) gives the
   old policy's log-probs and, with teachers, the ``r+`` / negative log-probs, weights and ``A_t``.
4. Optionally the frozen reference's log-probs, and the CEPO diagnostics.

The update's grad-enabled passes (:meth:`Experience.micro_batches`,
:meth:`Experience.policy_logprobs`) use the same strategy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cepo.advantages import (
    Negative,
    NegativeChoice,
    delta_diagnostics,
    grpo_advantages,
    negative_contexts,
    negative_stats,
    select_negatives,
)
from cepo.scoring import MicroBatch, PackedPasses, PaddedPasses, TeacherContexts, sequence_advantages_per_token


# ----------------------------------------------------------------------------- data passed along
@dataclass
class Rollouts:
    """One step's samples on this rank: ``P`` groups of ``G`` rollouts, groups contiguous."""

    prompts: list[list[int]]  # (P,) prompt token ids
    responses: list[list[int]]  # (P * G,) response token ids (with EOS when the model stopped)
    texts: list[str]  # (P * G,) decoded responses
    answers: list[str]  # (P,) ground-truth answers
    questions: list[str]  # (P,) question texts
    group_size: int
    rewards: torch.Tensor | None = None  # (P * G,) float32, set by the reward step
    sampler_logprobs: list[list[float]] | None = None  # per response token, from a sampler that reports them
    vision: object = None  # VL models: a cepo.vision.StepVision (per-prompt images, the tower's cached output)

    @property
    def width(self) -> int:
        """``R``: the longest response (at least 1)."""
        return max(1, max(len(r) for r in self.responses))

    def per_rollout(self, values: list) -> list:
        """A per-prompt list ``(P,)`` repeated for each rollout of the group, ``(P * G,)``."""
        return [v for v in values for _ in range(self.group_size)]

    def contexts(self) -> list[list[int]]:
        """The prompt of every rollout, ``(P * G,)``."""
        return self.per_rollout(self.prompts)


@dataclass
class Scored:
    """What the update needs, every tensor ``(B, R)`` on the CPU (``B = P * G``) unless noted."""

    old_logp: torch.Tensor  # float32, the policy before the update
    advantages: torch.Tensor  # float32 A_t (A on every token for GRPO / lam = 0), 0 at padding
    mask: torch.Tensor  # bool, True on response tokens
    seq_advantages: torch.Tensor  # (B,) float32 group-normalised A
    lam: float
    ref_logp: torch.Tensor | None = None  # float32, frozen reference (kl_coef > 0)
    pos: torch.Tensor | None = None  # float32 log-probs under [prompt, r+] (teachers on)
    neg: torch.Tensor | None = None  # float32 log-probs under the negative context (teachers on)
    weights: torch.Tensor | None = None  # float32 clipped weights c_t (teachers on)
    negatives: list[Negative] | None = None  # (P,) the negative context of each group (teachers on)
    r_minus: list[str | None] | None = None  # (P,) the r- answer where the negative is r-
    stats: dict = field(default_factory=dict)  # metrics of this phase


class Experience:
    """Scores rollouts (:meth:`score`) and runs the update's policy passes, with one pass strategy
    (:class:`cepo.scoring.PackedPasses` or :class:`cepo.scoring.PaddedPasses`)."""

    def __init__(self, cfg, tokenizer, device, passes: PackedPasses | PaddedPasses):
        self.cfg, self.tokenizer, self.device, self.passes = cfg, tokenizer, device, passes
        self._teacher_cache: dict[str, list[int]] = {}

    @property
    def packed(self) -> bool:
        return self.passes.packed

    # -- contexts
    def teacher_ids(self, answer: str) -> list[int]:
        """Tokens of ``teacher_template.format(answer=answer)``, inserted after the prompt."""
        if answer not in self._teacher_cache:
            text = self.cfg.algorithm.teacher_template.format(answer=answer)
            self._teacher_cache[answer] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._teacher_cache[answer]

    def choose_negatives(self, rollouts: Rollouts) -> list[NegativeChoice]:
        """CEPO's ``r-`` per group (:func:`cepo.advantages.select_negatives`)."""
        acfg = self.cfg.algorithm
        return select_negatives(rollouts.rewards.tolist(), rollouts.texts, rollouts.group_size, acfg.reject_threshold)

    # -- scoring
    def score(self, model, rollouts: Rollouts, lam: float, *, ref_model=None) -> Scored:
        """Old-policy log-probs, and with ``lam > 0`` the teacher log-probs, weights and ``A_t``."""
        acfg = self.cfg.algorithm
        seq_adv = grpo_advantages(rollouts.rewards, rollouts.group_size, acfg.scale_by_std)
        negatives, r_minus, choices, teachers = None, None, None, None
        if lam > 0 and acfg.name != "grpo":
            choices = self.choose_negatives(rollouts) if acfg.name == "cepo" else None
            negatives = negative_contexts(acfg.name, choices, len(rollouts.prompts), acfg.no_rejected)
            r_minus = [choices[g].answer if n is Negative.R_MINUS else None for g, n in enumerate(negatives)]
            teachers = TeacherContexts(
                negatives,
                [self.teacher_ids(a) for a in rollouts.answers],
                [None if a is None else self.teacher_ids(a) for a in r_minus],
            )
        streams = self.passes.score(model, rollouts, seq_adv, lam, teachers)
        advantages = streams.advantages
        if advantages is None:
            advantages = sequence_advantages_per_token(seq_adv, streams.mask)
        scored = Scored(
            streams.policy, advantages, streams.mask, seq_adv, lam, pos=streams.pos, neg=streams.neg,
            weights=streams.weights, negatives=negatives, r_minus=r_minus, stats={"tokens/experience": streams.tokens},
        )  # fmt: skip
        if ref_model is not None:
            t0 = time.perf_counter()
            scored.ref_logp, tokens = self.passes.reference_logprobs(ref_model, rollouts)
            scored.stats["tokens/experience"] += tokens
            scored.stats["time/logprob_ref"] = time.perf_counter() - t0
        if negatives is not None:
            if choices is not None:
                scored.stats.update(negative_stats(choices))
            scored.stats.update(
                delta_diagnostics(
                    seq_adv, rollouts.rewards, scored.pos, scored.neg, scored.mask, scored.weights, acfg.eps_w,
                    acfg.reject_threshold,
                )
            )  # fmt: skip
        return scored

    # -- the update's policy passes
    def micro_batches(self, rollouts: Rollouts, rows: slice) -> list[MicroBatch]:
        """The micro-batches of one mini-batch (rollout rows ``rows``)."""
        return self.passes.micro_batches(rollouts, rows)

    def policy_logprobs(self, model, mb: MicroBatch, *, return_entropy: bool = True):
        """``(logp, entropy or None, mask)``, each ``(b, R)`` on the compute device, differentiable
        when grad is enabled; ``model`` is the engine (or any causal LM)."""
        return self.passes.policy_logprobs(model, mb, return_entropy=return_entropy)


__all__ = ["Experience", "Rollouts", "Scored"]
