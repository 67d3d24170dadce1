"""The experience phase and the policy passes of the update: per-response-token log-probs, CEPO
weights and token advantages of one step's rollouts, packed or padded.

**Packed** (``optim.packing``, the default for Qwen2 / Qwen3 / Llama): each group becomes one
shared-prefix tree, ``prompt | r+ | r- | 3G responses`` for CEPO (RLSD: ``prompt | r+ | 2G``;
GRPO, or ``lam == 0``: ``prompt | G``), packed into rows, micro-batches of whole groups. One
no-grad decoder forward per micro-batch with tree attention (``cepo.hf_attention``), then ONE call
of ``cepo_kernels.linear_contrastive_logprobs`` on the final hidden states at the
response-predicting positions gives the old-policy, ``r+`` and ``r-`` log-probs, the weights and
``A_t`` (RLSD: the two-stream call with the policy as the negative; GRPO: ``linear_token_logprobs``).
The update pass packs ``prompt | G responses`` per group with grad on, so each prompt is encoded
once per micro-batch and its gradient collects every response's.

**Padded** (``optim.packing=false``, the oracle): one left-padded ``[context, response]`` batch
per context (old policy, ``r+``, ``r-``) through the model's own attention, and
``cepo_kernels.contrastive_advantage`` on the results (:mod:`cepo.logprobs`).

For response ``n``, token ``t`` and context ``c``::

    logp_c[n, t] = log softmax(W h_c(n, t) / T)[y_{n,t}]

where ``h_c(n, t)`` is the final hidden state (after the model's last norm) of the position that
predicts ``y_{n,t}``. Padded entries are 0 (weights 1, advantages 0).

The low-level group pass used by the tests and benchmarks (:func:`group_logprobs`,
:func:`policy_logprobs`, :func:`packed_response_logprobs`) is at the end of the module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cepo import hf_attention
from cepo.advantages import (
    NegativeChoice,
    contrastive_token_advantages,
    delta_diagnostics,
    grpo_advantages,
    select_negatives,
)
from cepo.hf_attention import packed_forward, tree_mode
from cepo.logprobs import Batch, batched_logprobs, build_batch, causal_lm, forward_logprobs
from cepo.packing import CONTEXTS, Group, PackedGroups, pack_groups
from cepo_kernels.linear_contrastive_logprobs import linear_contrastive_logprobs
from cepo_kernels.linear_token_logprobs import linear_token_logprobs

log = logging.getLogger("cepo.experience")

IGNORE = -100


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

    @property
    def width(self) -> int:
        """``R``: the longest response (at least 1)."""
        return max(1, max(len(r) for r in self.responses))

    def contexts(self) -> list[list[int]]:
        """The prompt of every rollout, ``(P * G,)``."""
        return [p for p in self.prompts for _ in range(self.group_size)]


@dataclass
class Scored:
    """What the update needs, every tensor ``(B, R)`` on the CPU (``B = P * G``) unless noted."""

    old_logp: torch.Tensor  # float32, the policy before the update
    advantages: torch.Tensor  # float32 A_t (A on every token for GRPO / lam = 0), 0 at padding
    mask: torch.Tensor  # bool, True on response tokens
    seq_advantages: torch.Tensor  # (B,) float32 group-normalised A
    lam: float
    ref_logp: torch.Tensor | None = None  # float32, frozen reference (kl_coef > 0)
    pos: torch.Tensor | None = None  # float32 log-probs under [prompt, r+] (lam > 0)
    neg: torch.Tensor | None = None  # float32 log-probs under the negative context (lam > 0)
    weights: torch.Tensor | None = None  # float32 clipped weights c_t (lam > 0)
    choices: list[NegativeChoice] | None = None  # CEPO: r- per group
    neg_answers: list[str | None] | None = None  # CEPO: the r- text used per group (None: fallback)
    stats: dict = field(default_factory=dict)  # metrics of this phase


@dataclass
class MicroBatch:
    """Rows ``rows`` of the step's rollouts, as a padded :class:`Batch` or a policy-only pack."""

    rows: slice
    batch: Batch | None = None
    packed: PackedGroups | None = None

    @property
    def tokens(self) -> int:
        t = self.packed.table.input_ids if self.packed is not None else self.batch.input_ids
        return int(t.numel())


# ----------------------------------------------------------------------------- packing choice
def packing_unavailable(cfg, model) -> str | None:
    """Why the packed passes cannot run for this config and model (``None``: they can)."""
    lm = causal_lm(model)
    reason = hf_attention.supports(lm)
    if reason:
        return reason
    if cfg.engine.zero_stage == 3:
        return (
            "engine.zero_stage=3 partitions the LM-head weight outside the model's forward, and the packed "
            "passes read it directly; use zero_stage <= 2"
        )
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear (e.g. LoRA on lm_head)"
    return None


def resolve_packing(cfg, model, groups_per_rank: int) -> bool:
    """``optim.packing``: ``auto`` packs where supported (and logs once why not), ``true`` raises
    where unsupported, ``false`` keeps the padded passes."""
    mode = cfg.optim.packing
    if mode == "false":
        return False
    reason = packing_unavailable(cfg, model)
    if reason is None and groups_per_rank % cfg.optim.updates_per_batch:
        reason = (
            f"{groups_per_rank} groups per rank do not split into optim.updates_per_batch="
            f"{cfg.optim.updates_per_batch} mini-batches of whole groups"
        )
    if reason is None:
        return True
    if mode == "true":
        raise ValueError(f"optim.packing=true: {reason}")
    log.info("optim.packing=auto: using padded passes because %s", reason)
    return False


# ----------------------------------------------------------------------------- the scorer
class Experience:
    """Scores rollouts (:meth:`score`) and runs the update's policy passes (:meth:`micro_batches`,
    :meth:`policy_logprobs`), packed or padded as decided once at set-up."""

    def __init__(self, cfg, tokenizer, device, *, packed: bool):
        self.cfg, self.tokenizer, self.device, self.packed = cfg, tokenizer, device, packed
        self.pad_id = tokenizer.pad_token_id
        backend = cfg.optim.logprob_backend
        self.head_backend = "auto" if backend == "cuda" else backend  # hidden-state ops have no cuda backend
        self._teacher_cache: dict[str, list[int]] = {}

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

    def _groups_per_micro(self) -> int:
        return max(1, self.cfg.optim.micro_batch_size // self.cfg.rollout.group_size)

    def _split(self, sizes: list[int]) -> list[list[int]]:
        """Consecutive runs of group indices: ``optim.micro_batch_tokens`` per micro-batch (a
        group larger than that alone), or ``micro_batch_size // G`` groups when it is 0."""
        budget = self.cfg.optim.micro_batch_tokens
        if budget <= 0:
            k = self._groups_per_micro()
            return [list(range(i, min(len(sizes), i + k))) for i in range(0, len(sizes), k)]
        runs, cur, used = [], [], 0
        for i, size in enumerate(sizes):
            if cur and used + size > budget:
                runs.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += size
        if cur:
            runs.append(cur)
        return runs

    def _pack(self, groups: list[Group], contexts: tuple[str, ...], width: int) -> PackedGroups:
        """The micro-batch's groups end to end in one row: no padding at all. Attention cost does
        not grow with the row: each segment attends only to its window (its ancestors and itself;
        the Triton kernel visits only those key blocks, the torch path gathers them)."""
        return pack_groups(groups, contexts=contexts, max_row_len=None, pad_id=self.pad_id, response_width=width)

    def _hidden(self, model, packed: PackedGroups) -> torch.Tensor:
        """``(R * T, D)`` final hidden states of a packed forward (grad as the caller's mode)."""
        lm = causal_lm(model)
        table = packed.table.to(self.device)
        with tree_mode(lm):
            hidden = packed_forward(lm, table, backend=self.head_backend)
        return hidden.reshape(-1, hidden.shape[-1])

    # -- scoring
    def score(self, model, rollouts: Rollouts, lam: float, *, ref_model=None) -> Scored:
        """Old-policy log-probs, and with ``lam > 0`` the teacher log-probs, weights and ``A_t``."""
        acfg, G = self.cfg.algorithm, rollouts.group_size
        seq_adv = grpo_advantages(rollouts.rewards, G, acfg.scale_by_std)
        # which contexts each group needs, and what stands in for the negative where r- is absent
        choices, neg_answers = None, None
        if lam > 0 and acfg.name == "cepo":
            choices = self.choose_negatives(rollouts)
            neg_answers = [c.answer if c.reason == "ok" else None for c in choices]
        if lam <= 0:
            mode = "policy"
        else:
            mode = "cepo" if acfg.name == "cepo" else "rlsd"
        fallback = ["policy"] * len(rollouts.prompts)  # stand-in for r- per group: RLSD's old policy
        if choices is not None:
            grpo_kept = acfg.no_rejected == "grpo"
            fallback = [
                "neg" if c.reason == "ok" else ("pos" if c.reason == "no_rejected" and grpo_kept else "policy")
                for c in choices
            ]
        if self.packed:
            scored = self._score_packed(model, rollouts, seq_adv, lam, mode, neg_answers, fallback)
        else:
            scored = self._score_padded(model, rollouts, seq_adv, lam, mode, neg_answers, fallback)
        scored.choices, scored.neg_answers = choices, neg_answers
        if ref_model is not None:
            t0 = time.perf_counter()
            scored.ref_logp, tokens = self._policy_only(ref_model, rollouts)
            scored.stats["tokens/experience"] += tokens
            scored.stats["time/logprob_ref"] = time.perf_counter() - t0
        if lam > 0:
            if choices is not None:
                with_rejected = sum(c.reason != "no_rejected" for c in choices)
                scored.stats["cepo/no_rejected_frac"] = sum(c.reason == "no_rejected" for c in choices) / len(choices)
                scored.stats["cepo/no_answer_frac"] = (
                    sum(c.reason == "no_answer" for c in choices) / with_rejected if with_rejected else 0.0
                )
            scored.stats.update(
                delta_diagnostics(
                    seq_adv, rollouts.rewards, scored.pos, scored.neg, scored.mask, scored.weights, acfg.eps_w,
                    acfg.reject_threshold,
                )
            )  # fmt: skip
        return scored

    def _score_packed(self, model, rollouts, seq_adv, lam, mode, neg_answers, fallback) -> Scored:
        G, R = rollouts.group_size, rollouts.width
        contexts = {"policy": ("policy",), "rlsd": ("policy", "pos"), "cepo": CONTEXTS}[mode]
        groups = []
        for g, prompt in enumerate(rollouts.prompts):
            own = None
            if mode == "cepo" and neg_answers[g] is None:
                own = ("policy", "pos")  # no r- for this group: nothing to pack under it
            groups.append(
                Group(
                    prompt,
                    rollouts.responses[g * G : (g + 1) * G],
                    self.teacher_ids(rollouts.answers[g]) if mode != "policy" else (),
                    self.teacher_ids(neg_answers[g]) if own is None and mode == "cepo" else (),
                    own,
                )
            )
        B, acc = len(rollouts.responses), _acc_dtype(model)
        out = {k: torch.zeros(B, R, dtype=acc) for k in ("policy", "pos", "neg", "adv")}
        out["weights"] = torch.ones(B, R, dtype=acc)
        mask = torch.zeros(B, R, dtype=torch.bool)
        tokens = 0
        with torch.no_grad():
            for run in self._split([g.packed_size(contexts) for g in groups]):
                packed = self._pack([groups[i] for i in run], contexts, R)
                tokens += packed.tokens
                rows = slice(run[0] * G, (run[-1] + 1) * G)
                neg_from = [fallback[i] for i in run for _ in range(G)]
                keep, res = self._score_pack(model, packed, contexts, seq_adv[rows], neg_from, lam)
                mask[rows] = keep
                for name, values in res.items():
                    out[name][rows] = _scatter(keep, values, fill=1.0 if name == "weights" else 0.0)
        if mode == "policy":
            adv = _sequence_advantages_per_token(seq_adv, mask)
            return Scored(out["policy"], adv, mask, seq_adv, lam, stats={"tokens/experience": tokens})
        return Scored(
            out["policy"], out["adv"], mask, seq_adv, lam, pos=out["pos"], neg=out["neg"], weights=out["weights"],
            stats={"tokens/experience": tokens},
        )  # fmt: skip

    def _score_pack(self, model, packed, contexts, seq_adv, neg_from, lam) -> tuple[torch.Tensor, dict]:
        """One packed forward and ONE LM-head call for the pack's ``b`` responses.

        ``seq_adv`` ``(b,)``; ``neg_from[n]`` says which stream is response ``n``'s negative:
        ``"neg"`` (its group's ``r-``), ``"policy"`` (RLSD's old policy) or ``"pos"`` (``r+``
        itself: delta = 0, ``A_t = A`` exactly). Returns ``keep`` ``(b, R)`` bool (CPU) and the
        ``(M,)`` values at ``keep`` of ``policy`` (and ``pos``, ``neg``, ``weights``, ``adv``).
        """
        flat = self._hidden(model, packed)
        targets = packed.targets(IGNORE).to(flat.device)
        idx = {c: packed.predict_index(c).to(flat.device) for c in contexts}
        if "neg" in contexts:  # groups without r- take their negative stream from another context
            idx["neg"] = idx["neg"].clone()  # the pack caches its index tables
            for name in ("policy", "pos"):
                sub = torch.tensor([f == name for f in neg_from], dtype=torch.bool, device=flat.device)
                idx["neg"][sub] = idx[name][sub]
        keep = targets != IGNORE
        for c in contexts:
            keep &= idx[c] >= 0
        tgt = targets[keep][:, None]  # (M, 1): each kept token its own length-1 "sequence"
        weight, bias = _lm_head(model)
        hidden = {c: flat.index_select(0, idx[c][keep])[:, None, :] for c in contexts}
        temperature, eps_w = self.cfg.rollout.temperature, self.cfg.algorithm.eps_w
        if contexts == ("policy",):
            logp = linear_token_logprobs(
                hidden["policy"], weight, tgt, temperature=temperature, bias=bias, backend=self.head_backend
            )
            return keep.cpu(), {"policy": logp[:, 0]}
        a_tok = seq_adv[:, None].expand(keep.shape).to(flat.device)[keep]
        if "neg" in contexts:
            streams = (hidden["policy"], hidden["pos"], hidden["neg"])
        else:  # RLSD: the two-stream call, the old policy as the negative
            streams = (None, hidden["pos"], hidden["policy"])
        res = linear_contrastive_logprobs(
            *streams, weight, tgt, a_tok, lam=lam, eps_w=eps_w, temperature=temperature, bias=bias,
            backend=self.head_backend,
        )  # fmt: skip
        policy = res.policy if res.policy is not None else res.neg
        values = {"policy": policy, "pos": res.pos, "neg": res.neg, "weights": res.weights, "adv": res.advantages}
        return keep.cpu(), {k: v[:, 0] for k, v in values.items()}

    def _padded_logprobs(self, model, contexts, responses, width) -> tuple[torch.Tensor, int]:
        batch = build_batch(contexts, responses, self.pad_id, response_width=width)
        return self._batch_logprobs(model, batch), int(batch.input_ids.numel())

    def _batch_logprobs(self, model, batch: Batch) -> torch.Tensor:
        return batched_logprobs(
            model,
            batch,
            micro_batch_size=self.cfg.optim.micro_batch_size,
            temperature=self.cfg.rollout.temperature,
            backend=self.cfg.optim.logprob_backend,
            device=self.device,
            fused_head=self.cfg.optim.fused_head,
        )

    def _score_padded(self, model, rollouts, seq_adv, lam, mode, neg_answers, fallback) -> Scored:
        acfg, G, R = self.cfg.algorithm, rollouts.group_size, rollouts.width
        contexts, responses = rollouts.contexts(), rollouts.responses
        batch = build_batch(contexts, responses, self.pad_id, response_width=R)
        mask = batch.mask
        old = self._batch_logprobs(model, batch)
        tokens = int(batch.input_ids.numel())
        if mode == "policy":
            adv = _sequence_advantages_per_token(seq_adv, mask)
            return Scored(old, adv, mask, seq_adv, lam, stats={"tokens/experience": tokens})
        answers = [a for a in rollouts.answers for _ in range(G)]
        pos, t = self._padded_logprobs(
            model, [c + self.teacher_ids(a) for c, a in zip(contexts, answers)], responses, R
        )
        tokens += t
        neg = old.clone()  # RLSD, and CEPO's fallback
        if mode == "cepo":
            need = [i for i in range(len(responses)) if fallback[i // G] == "neg"]
            if need:
                ctx = [contexts[i] + self.teacher_ids(neg_answers[i // G]) for i in need]
                neg[need], t = self._padded_logprobs(model, ctx, [responses[i] for i in need], R)
                tokens += t
            same = [i for i in range(len(responses)) if fallback[i // G] == "pos"]
            neg[same] = pos[same]  # delta = 0: A_t = A exactly
        adv, weights = contrastive_token_advantages(
            seq_adv, pos, neg, mask, lam=lam, eps_w=acfg.eps_w, backend=self.cfg.optim.logprob_backend
        )
        return Scored(
            old, adv, mask, seq_adv, lam, pos=pos, neg=neg, weights=weights, stats={"tokens/experience": tokens}
        )

    def _policy_only(self, model, rollouts: Rollouts) -> tuple[torch.Tensor, int]:
        """``(B, R)`` no-grad log-probs of the responses under ``model`` (the reference), tokens run."""
        R = rollouts.width
        if not self.packed:
            return self._padded_logprobs(model, rollouts.contexts(), rollouts.responses, R)
        logp = torch.zeros(len(rollouts.responses), R, dtype=_acc_dtype(model))
        tokens = 0
        with torch.no_grad():
            for mb in self._update_micro_batches(rollouts, range(len(rollouts.prompts)), agree=False):
                lp, _, _ = self.policy_logprobs(model, mb, return_entropy=False)
                logp[mb.rows] = lp.to(logp.dtype).cpu()
                tokens += mb.tokens
        return logp, tokens

    # -- the update's policy passes
    def micro_batches(self, rollouts: Rollouts, rows: slice) -> list[MicroBatch]:
        """The micro-batches of one mini-batch (rollout rows ``rows``). Packed: whole groups, the
        same number on every rank (the longest split is agreed, shorter ones are split further)."""
        if not self.packed:
            mbs = self.cfg.optim.micro_batch_size
            contexts, responses = rollouts.contexts(), rollouts.responses
            batch = build_batch(contexts[rows], responses[rows], self.pad_id, response_width=rollouts.width)
            return [
                MicroBatch(slice(rows.start + i, rows.start + i + mbs), batch=batch.rows(slice(i, i + mbs)))
                for i in range(0, rows.stop - rows.start, mbs)
            ]
        G = rollouts.group_size
        return self._update_micro_batches(rollouts, range(rows.start // G, rows.stop // G), agree=True)

    def _update_micro_batches(self, rollouts: Rollouts, group_ids: range, *, agree: bool) -> list[MicroBatch]:
        G, R = rollouts.group_size, rollouts.width
        groups = [Group(rollouts.prompts[g], rollouts.responses[g * G : (g + 1) * G]) for g in group_ids]
        runs = self._split([g.packed_size(("policy",)) for g in groups])
        if agree and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([len(runs)], dtype=torch.long)
            if torch.cuda.is_available():
                count = count.cuda()
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            while len(runs) < int(count.item()):  # split the run with the most groups
                i = max(range(len(runs)), key=lambda j: len(runs[j]))
                half = len(runs[i]) // 2
                runs[i : i + 1] = [runs[i][:half], runs[i][half:]]
        first = group_ids[0]
        out = []
        for run in runs:
            packed = self._pack([groups[i] for i in run], ("policy",), R)
            rows = slice((first + run[0]) * G, (first + run[-1] + 1) * G)
            out.append(MicroBatch(rows, packed=packed))
        return out

    def policy_logprobs(self, model, mb: MicroBatch, *, return_entropy: bool = True):
        """``(logp, entropy or None, mask)``, each ``(b, R)`` on the compute device, differentiable
        when grad is enabled; ``model`` is the engine (or any causal LM)."""
        cfg = self.cfg
        if mb.packed is None:
            batch = mb.batch.to(self.device)
            res = forward_logprobs(
                model, batch, temperature=cfg.rollout.temperature, backend=cfg.optim.logprob_backend,
                return_entropy=return_entropy, fused_head=cfg.optim.fused_head,
            )  # fmt: skip
            logp, entropy = res if return_entropy else (res, None)
            return logp, entropy, batch.mask
        packed = mb.packed
        flat = self._hidden(model, packed)
        targets = packed.targets(IGNORE).to(flat.device)
        idx = packed.predict_index("policy").to(flat.device)
        keep = (targets != IGNORE) & (idx >= 0)
        weight, bias = _lm_head(model)
        res = linear_token_logprobs(
            flat.index_select(0, idx[keep]), weight, targets[keep], temperature=cfg.rollout.temperature, bias=bias,
            return_entropy=return_entropy, backend=self.head_backend,
        )  # fmt: skip
        logp, entropy = res if return_entropy else (res, None)
        zeros = torch.zeros(keep.shape, dtype=logp.dtype, device=flat.device)
        logp = zeros.masked_scatter(keep, logp)
        if entropy is not None:
            entropy = zeros.masked_scatter(keep, entropy.detach())
        return logp, entropy, keep


def _sequence_advantages_per_token(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, R)``: GRPO's ``A`` on every response token (``mask``), 0 at padding."""
    return torch.where(mask, seq_adv[:, None].expand_as(mask), torch.zeros(()))


def _acc_dtype(model) -> torch.dtype:
    """float64 for a float64 model (exact tests), else float32."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _scatter(keep: torch.Tensor, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(b, R)`` CPU tensor with ``values`` (``(M,)``, row-major order of ``keep``) at ``keep``,
    ``fill`` elsewhere; float32 (float64 for float64 values)."""
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    out = torch.full(keep.shape, fill, dtype=dtype)
    out[keep.cpu()] = values.detach().to(dtype).cpu()
    return out


def _lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError("model: has no output embeddings (LM head)")
    return head.weight, getattr(head, "bias", None)


# ----------------------------------------------------------------------------- the low-level group pass
# The call site is switchable: set to a function with linear_token_logprobs' signature, or None for the default.
LOGPROB_FN: Callable[..., torch.Tensor] | None = None


def default_logprob_fn() -> Callable[..., torch.Tensor]:
    """The LM-head log-prob function the group pass uses (:data:`LOGPROB_FN` or ``linear_token_logprobs``)."""
    return LOGPROB_FN or linear_token_logprobs


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

    The LM head (``logprob_fn``, default :func:`default_logprob_fn`) runs once over the hidden
    states gathered at every response-predicting position of all contexts. Differentiable when
    grad is enabled. ``model`` must already use ``"cepo_tree"`` attention.
    """
    contexts = tuple(contexts or packed.contexts)
    fn = logprob_fn or default_logprob_fn()
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


__all__ = [
    "Experience", "GroupLogprobs", "MicroBatch", "Rollouts", "Scored", "group_logprobs",
    "packed_response_logprobs", "packing_unavailable", "policy_logprobs", "resolve_packing",
]  # fmt: skip
