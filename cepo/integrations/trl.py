"""CEPO and RLSD inside TRL: ``from cepo.integrations.trl import CEPOConfig, CEPOTrainer``.

:class:`CEPOTrainer` is TRL's ``GRPOTrainer`` with one change, made where TRL's maintainers advise
(huggingface/trl#4525): after TRL's own generation, rewards and group-normalised advantages ``A``
``(B,)``, :meth:`CEPOTrainer._generate_and_score_completions` replaces ``advantages`` by the
per-token ``A_t`` ``(B, T)``, which TRL's loss takes as it is::

    delta_t = log P(y_t | prompt, r+, y<t) - log P(y_t | negative context, y<t)
    c_t     = clip(exp(sign(A) * delta_t), 1 - eps_w, 1 + eps_w)
    A_t     = A * (1 + lam * (c_t - 1))

``r+`` is the ground truth from the dataset's answer column (``cepo_answer_column``), inserted after
the prompt with ``cepo_teacher_template``. The negative context of each group is chosen exactly as
``cepo train`` chooses it, by the same function (:func:`cepo.advantages.choose_negatives`): CEPO's
``r-`` is the final answer of the group's lowest-scoring rejected completion (reward below
``cepo_reject_threshold``), with the same fallbacks; RLSD's negative is the old policy. The teacher
log-probs come from the same no-grad passes as ``cepo train`` (:mod:`cepo.scoring`): shared-prefix
packs with tree attention and ``linear_contrastive_logprobs`` where the model supports it, padded
passes elsewhere.

Across processes: TRL gathers every process's rewards before normalising them per group, because a
group's ``G`` completions may live on different processes; the completions' texts are gathered here
the same way, so every process sees whole groups when it chooses ``r-``. Each process then scores
only its own completions (a group split between processes is scored in pieces of
``gcd(rows per process, G)`` completions that share its prompt).

Everything else stays TRL's: reward functions (their weighted sum is the reward compared with the
threshold), ``scale_rewards``, the loss types, vLLM, PEFT, accelerate / DeepSpeed, logging. The
``cepo/*`` metrics join TRL's logs. Evaluation keeps TRL's advantages (``A`` on every token).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError('cepo.integrations.trl needs TRL: pip install "cepo[trl]"') from exc
from accelerate.utils import gather_object
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from cepo.advantages import Negative, choose_negatives, delta_diagnostics, lam_at, negative_stats
from cepo.config import AlgorithmConfig, DataConfig, OptimConfig, RolloutConfig, ScoringConfig, TrainConfig
from cepo.experience import Experience, Rollouts
from cepo.scoring import TeacherContexts, build_passes

# The TRL releases this module is tested with: it overrides a private GRPOTrainer method whose
# inputs and outputs change between releases.
TESTED_TRL = ">=1.16.0,<1.17"

_ALG, _DATA, _SCORING = AlgorithmConfig(), DataConfig(), ScoringConfig()

# CEPOConfig key -> the `cepo train` config key it sets (errors from cepo's validation name the former).
KEYS = {
    "cepo_algorithm": "algorithm.name",
    "cepo_lam": "algorithm.lam",
    "cepo_lam_schedule": "algorithm.lam_schedule",
    "cepo_lam_decay_steps": "algorithm.lam_decay_steps",
    "cepo_eps_w": "algorithm.eps_w",
    "cepo_teacher_template": "algorithm.teacher_template",
    "cepo_reject_threshold": "algorithm.reject_threshold",
    "cepo_no_rejected": "algorithm.no_rejected",
    "cepo_packing": "scoring.packing",
    "cepo_kernel_backend": "scoring.kernel_backend",
    "cepo_micro_batch_tokens": "scoring.micro_batch_tokens",
    "temperature": "rollout.temperature",
}


def check_trl_version(version: str | None = None) -> None:
    """Raise ``ValueError`` unless TRL ``version`` (default: the installed one) is in :data:`TESTED_TRL`."""
    version = trl.__version__ if version is None else version
    if Version(version) not in SpecifierSet(TESTED_TRL):
        raise ValueError(
            f"trl {version} is installed; cepo.integrations.trl is tested with trl{TESTED_TRL} (it overrides "
            f'GRPOTrainer internals that change between releases): pip install "cepo[trl]"'
        )


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class CEPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the algorithm keys of ``cepo train``, prefixed ``cepo_`` so they
    cannot collide with TRL's; defaults as in ``cepo``'s own config. ``temperature`` (TRL's) is also
    the temperature of the teacher log-probs, as it is of TRL's own."""

    cepo_algorithm: str = field(
        default="cepo", metadata=_help("'cepo' (negative context r-) or 'rlsd' (negative: the old policy)")
    )
    cepo_lam: float = field(default=_ALG.lam, metadata=_help("initial weight of the teacher term in [0, 1]; 0 is GRPO"))
    cepo_lam_schedule: str = field(
        default=_ALG.lam_schedule, metadata=_help("decay of lam: 'linear', 'cosine' or 'constant'")
    )
    cepo_lam_decay_steps: int = field(
        default=_ALG.lam_decay_steps, metadata=_help("lam reaches 0 at step T+1; 0 keeps lam constant")
    )
    cepo_eps_w: float = field(default=_ALG.eps_w, metadata=_help("token weight clipped to [1-eps_w, 1+eps_w]"))
    cepo_teacher_template: str = field(
        default=_ALG.teacher_template, metadata=_help("teacher context inserted after the prompt; has '{answer}'")
    )
    cepo_reject_threshold: float = field(
        default=_ALG.reject_threshold, metadata=_help("a completion whose reward is below this is 'rejected'")
    )
    cepo_no_rejected: str = field(
        default=_ALG.no_rejected,
        metadata=_help("a group without a rejected completion: 'rlsd' (negative = policy) or 'grpo' (A_t = A)"),
    )
    cepo_answer_column: str = field(
        default=_DATA.answer_field, metadata=_help("dataset column holding the ground truth (r+)")
    )
    cepo_packing: str = field(
        default=_SCORING.packing,
        metadata=_help("teacher pass: shared-prefix packs 'auto' (where supported), 'true' or 'false' (padded)"),
    )
    cepo_kernel_backend: str = field(
        default=_SCORING.kernel_backend, metadata=_help("cepo_kernels backend: 'auto', 'torch', 'triton', 'cuda'")
    )
    cepo_micro_batch_tokens: int = field(
        default=_SCORING.micro_batch_tokens,
        metadata=_help("packed teacher pass: tokens per forward; 0: per_device_train_batch_size completions"),
    )

    def __post_init__(self):
        check_trl_version()
        if self.cepo_algorithm not in ("cepo", "rlsd"):
            raise ValueError(
                f"cepo_algorithm: expected 'cepo' or 'rlsd', got {self.cepo_algorithm!r} "
                "(plain GRPO: TRL's GRPOTrainer, or cepo_lam=0)"
            )
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(
                f"num_generations: expected >= 2 completions per prompt (a group needs a reward baseline and a "
                f"rejected completion for r-), got {self.num_generations!r}"
            )
        if not self.cepo_answer_column:
            raise ValueError("cepo_answer_column: expected the name of the dataset column holding the answer")
        if self.remove_unused_columns:
            raise ValueError(
                f"remove_unused_columns=True drops the answer column {self.cepo_answer_column!r} before CEPO sees "
                "it; set remove_unused_columns=False"
            )
        super().__post_init__()
        self.cepo_train_config(self.num_generations)  # validates the cepo_* keys

    def cepo_train_config(self, group_size: int, micro_batch_size: int | None = None) -> TrainConfig:
        """The ``cepo train`` configuration of the teacher pass: the algorithm and scoring keys, TRL's
        temperature, groups of ``group_size`` completions and ``micro_batch_size`` rows per padded
        forward (default ``per_device_train_batch_size``). ``ValueError`` names the ``cepo_*`` key."""
        mbs = micro_batch_size or max(group_size, self.per_device_train_batch_size)
        try:
            return TrainConfig(
                algorithm=AlgorithmConfig(
                    name=self.cepo_algorithm,
                    scale_by_std=False,  # A is TRL's (scale_rewards); cepo's own is not computed
                    lam=self.cepo_lam,
                    lam_schedule=self.cepo_lam_schedule,
                    lam_decay_steps=self.cepo_lam_decay_steps,
                    eps_w=self.cepo_eps_w,
                    reject_threshold=self.cepo_reject_threshold,
                    no_rejected=self.cepo_no_rejected,
                    teacher_template=self.cepo_teacher_template,
                ),
                rollout=RolloutConfig(group_size=group_size, temperature=self.temperature),
                optim=OptimConfig(micro_batch_size=mbs),
                scoring=ScoringConfig(
                    packing=self.cepo_packing,
                    kernel_backend=self.cepo_kernel_backend,
                    micro_batch_tokens=self.cepo_micro_batch_tokens,
                ),
            )
        except ValueError as exc:
            message = str(exc)
            for key, dotted in KEYS.items():
                message = message.replace(dotted, key)
            raise ValueError(message) from None


def _check_answer_column(dataset, column: str) -> None:
    """``ValueError`` when ``dataset`` (a datasets ``Dataset`` / ``IterableDataset``) lacks ``column``;
    a stream that does not know its columns is checked at the first batch instead."""
    if dataset is None:
        return
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict: TRL wants one split
        raise ValueError("train_dataset: expected a Dataset or IterableDataset, got a DatasetDict (pick a split)")
    if names is not None and column not in names:
        raise ValueError(
            f"train_dataset: no column {column!r} (cepo_answer_column, the ground truth r+); its columns are "
            f"{sorted(names)}"
        )


def _text(completion) -> str:
    """A completion as TRL hands it to reward functions: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(content or "")
    return "".join(parts)


class CEPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with CEPO's (or RLSD's) per-token advantages ``A_t`` (module docstring).

    Takes ``GRPOTrainer``'s arguments; ``args`` is a :class:`CEPOConfig` and ``train_dataset`` has
    the ``cepo_answer_column`` column. ``ValueError`` at construction for a TRL outside
    :data:`TESTED_TRL`, a dataset without the answer column, or ``num_generations < 2``.
    """

    _tag_names = ["trl", "grpo", "cepo"]
    _name = "CEPO"

    def __init__(self, model, reward_funcs=None, args: CEPOConfig | None = None, train_dataset=None, *rest, **kwargs):
        check_trl_version()
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = CEPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-CEPO")
        if not isinstance(args, CEPOConfig):
            raise ValueError(
                f"args: expected a CEPOConfig (GRPOConfig plus the cepo_* keys), got {type(args).__name__}"
            )
        _check_answer_column(train_dataset, args.cepo_answer_column)
        super().__init__(model, reward_funcs, args, train_dataset, *rest, **kwargs)
        self._cepo_experience: Experience | None = None  # built at the first training batch
        self._cepo_batch: dict | None = None  # what _calculate_rewards saw, for the override

    # -- what TRL computes and does not return: the gathered rewards and this process's completions
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._cepo_batch = {
            "rewards_per_func": rewards_per_func,  # (N, F) for all N completions of all processes
            "completions": completions,  # this process's
            "completion_ids": completion_ids_list,  # this process's, unpadded
        }
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation keeps TRL's advantages
            return output
        args: CEPOConfig = self.args
        lam = lam_at(self.state.global_step + 1, args.cepo_lam, args.cepo_lam_schedule, args.cepo_lam_decay_steps)
        self._metrics["train"]["cepo/lam"].append(lam)
        if lam <= 0:
            return output
        t0 = time.perf_counter()
        output["advantages"], stats = self._cepo_advantages(inputs, output, lam)
        stats["cepo/teacher_time"] = time.perf_counter() - t0
        device = self.accelerator.device
        for name in sorted(set(gather_object(list(stats)))):  # the same names, in the same order, everywhere
            value = torch.tensor([stats.get(name, math.nan)], dtype=torch.float32, device=device)
            self._metrics["train"][name].append(torch.nanmean(self.accelerator.gather(value)).item())
        return output

    # -- the teacher pass
    def _cepo_scorer(self, group_size: int) -> Experience:
        """The ``cepo train`` scorer, built once (packed or padded, decided at set-up)."""
        if self._cepo_experience is None:
            cfg = self.args.cepo_train_config(group_size)
            if self.is_deepspeed_enabled:
                cfg.engine.zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage
            device = self.accelerator.device
            tokenizer = self.processing_class
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
            passes = build_passes(cfg, self.model, tokenizer.pad_token_id, device, groups_per_rank=1)
            self._cepo_experience = Experience(cfg, tokenizer, device, passes)
        return self._cepo_experience

    def _cepo_advantages(self, inputs: list[dict], output: dict, lam: float) -> tuple[torch.Tensor, dict]:
        """``(A_t, stats)``: ``A_t`` ``(B, T)`` float32 on the device for this process's ``B``
        completions, ``T`` the width of ``output["completion_ids"]``."""
        args: CEPOConfig = self.args
        column, G = args.cepo_answer_column, self.num_generations
        if column not in inputs[0]:
            raise ValueError(f"train_dataset: no column {column!r} (cepo_answer_column, the ground truth r+)")
        if "pixel_values" in output:
            raise ValueError("CEPOTrainer: image prompts are not supported (the teacher pass is text-only)")
        batch, self._cepo_batch = self._cepo_batch, None
        B = len(inputs)
        # Whole groups on every process: the rewards TRL gathered, the texts gathered here.
        per_func = batch["rewards_per_func"]
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        texts = gather_object([_text(c) for c in batch["completions"]])
        cfg = args.cepo_train_config(G)
        negatives, choices = choose_negatives(cfg.algorithm, lam, rewards.tolist(), texts, G)
        if negatives is None:
            return output["advantages"], {}

        # This process's rows [start, start + B) of the global batch, in pieces of s rows of one group.
        start = self.accelerator.process_index * B
        s = math.gcd(B, G)
        pieces = range(0, B, s)
        group_of = [(start + j) // G for j in pieces]
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"].bool()
        answers = []
        for j in pieces:
            answer = inputs[j][column]
            if answer is None:
                raise ValueError(f"train_dataset: column {column!r} is None for prompt {inputs[j].get('prompt')!r}")
            answers.append(str(answer))
        rollouts = Rollouts(
            prompts=[prompt_ids[j][prompt_mask[j]].tolist() for j in pieces],
            responses=[list(ids) for ids in batch["completion_ids"]],
            texts=texts[start : start + B],
            answers=answers,
            questions=[""] * len(answers),
            group_size=s,
            rewards=rewards[start : start + B].float().cpu(),
        )
        experience = self._cepo_scorer(s)
        local_negatives = [negatives[g] for g in group_of]
        teachers = TeacherContexts(
            local_negatives,
            [experience.teacher_ids(a) for a in answers],
            [
                experience.teacher_ids(choices[g].answer) if n is Negative.R_MINUS else None
                for g, n in zip(group_of, local_negatives)
            ],
        )
        seq_adv = output["advantages"].detach().float().cpu()
        streams = experience.passes.score(self.model, rollouts, seq_adv, lam, teachers)

        T = output["completion_ids"].shape[1]
        a_t = torch.zeros(B, T, dtype=torch.float32)
        width = min(T, streams.advantages.shape[1])
        a_t[:, :width] = streams.advantages[:, :width].float()

        stats = delta_diagnostics(
            seq_adv, rollouts.rewards, streams.pos, streams.neg, streams.mask, streams.weights,
            cfg.algorithm.eps_w, cfg.algorithm.reject_threshold,
        )  # fmt: skip
        stats["cepo/teacher_tokens"] = float(streams.tokens)
        stats["cepo/packed"] = float(experience.packed)
        if choices is not None:
            stats.update(negative_stats(choices))
        return a_t.to(output["advantages"].device), stats


__all__ = ["CEPOConfig", "CEPOTrainer", "TESTED_TRL", "check_trl_version"]
