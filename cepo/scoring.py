"""The log-prob passes of a step: per-response-token log-probs under the policy and the teacher
contexts, packed (shared prefix, tree attention) or padded, behind one small interface.

Two strategies implement the same four methods (:class:`PackedPasses`, :class:`PaddedPasses`);
:func:`build_passes` picks one once at set-up (``scoring.packing``), so the experience phase and
the update never branch on it:

- ``score(model, rollouts, seq_adv, lam, teachers)``: no grad, the old policy's
  log-probs and, with teachers, the ``r+`` / negative log-probs, the weights and ``A_t``
  (:class:`Streams`);
- ``reference_logprobs(model, rollouts)``: no grad, the policy context only (a frozen reference);
- ``micro_batches(rollouts, rows)`` and ``policy_logprobs(model, micro_batch)``: the update's
  grad-enabled passes.

**Packed** (the default for Qwen2 / Qwen3 / Llama): each group is one shared-prefix tree
(:mod:`cepo.packing`): ``prompt | r+ | r- | 3G responses`` when the group's negative is ``r-``,
``prompt | r+ | 2G`` when it is the policy or ``r+`` itself, ``prompt | G`` without teachers. The
groups of a micro-batch lie end to end in one row; one decoder forward per micro-batch
(:meth:`PackedPasses.forward_hidden`), then ONE LM-head call (:func:`head_logprobs`) on the final
hidden states at the response-predicting positions of every stream: the three-stream
``cepo_kernels.linear_contrastive_logprobs`` (old policy, ``r+``, negative, weights and ``A_t``),
its two-stream form when every negative is the policy, or ``linear_token_logprobs`` without
teachers.

**Padded** (``scoring.packing=false``, the oracle): one left-padded ``[context, response]`` batch
per context through the model's own attention (:func:`build_batch`), log-probs from the hidden
states with the fused LM head where the head is a plain ``nn.Linear`` (else from the logits with
``cepo_kernels.token_logprobs``), and ``cepo_kernels.contrastive_advantage`` on the results.

For response ``n``, token ``t`` and context ``c``::

    logp_c[n, t] = log softmax(W h_c(n, t) / T)[y_{n,t}]

where ``h_c(n, t)`` is the final hidden state of the position that predicts ``y_{n,t}``. Every
output is ``(B, R)`` (``B`` rollouts, ``R`` the longest response) on the CPU, float32 (float64 for
a float64 model); 0 past each response (weights 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

import cepo_kernels
from cepo import hf_attention, vision
from cepo.advantages import Negative, contrastive_token_advantages
from cepo.hf_attention import packed_forward, tree_mode
from cepo.packing import CONTEXTS, Group, PackedGroups, pack_groups
from cepo_kernels.linear_contrastive_logprobs import linear_contrastive_logprobs
from cepo_kernels.linear_token_logprobs import linear_token_logprobs

log = logging.getLogger("cepo.scoring")

IGNORE = -100


# ----------------------------------------------------------------------------- model access
def causal_lm(model):
    """The transformers causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    lm = getattr(model, "module", model)  # DeepSpeed engine
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft (LoRA layers stay injected)


def head_logprobs(model, fn: Callable, hidden: tuple, *args, **kwargs):
    """Every LM-head log-prob call of the scoring and update passes goes through here:
    ``fn(*hidden, W, *args, bias=b, **kwargs)`` with the head's weight ``W`` ``(V, D)`` and bias,
    ``fn`` being ``linear_token_logprobs`` or ``linear_contrastive_logprobs``.

    ``fn`` runs AS the head module's forward (installed for this call, the weight read inside), and
    the module is called with the hidden states: under ZeRO-3 DeepSpeed gathers the partitioned
    weight around the head's forward and again around its backward (where ``fn`` recomputes the
    logits from it), as for an ordinary ``nn.Linear`` head, tied or not."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError("model: has no output embeddings (LM head)")

    def forward(*h):
        return fn(*h, head.weight, *args, bias=getattr(head, "bias", None), **kwargs)

    own = head.__dict__.get("forward")  # None: the class's forward
    head.forward = forward
    try:
        return head(*hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def through_engine(model, fn: Callable, *args, **kwargs):
    """``fn(module, *args, **kwargs)`` run inside ``model.forward`` when ``model`` is a DeepSpeed
    engine and grad is enabled (forward redirection); else ``fn(model, ...)`` directly.

    ZeRO-3 advances its gradient-accumulation micro-step only inside ``DeepSpeedEngine.forward``;
    a gradient pass that calls the decoder directly keeps only the last micro-batch's gradients,
    silently. So ``engine.module.forward`` is replaced for one call by a closure that restores it
    and runs ``fn`` on the module, and the engine is called."""
    inner = getattr(model, "module", None)
    if inner is None or not torch.is_grad_enabled() or not hasattr(model, "zero_optimization_stage"):
        return fn(model, *args, **kwargs)
    own = inner.__dict__.get("forward")

    def restore():
        if own is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = own

    def redirected(*_a, **_k):
        restore()
        return fn(inner, *args, **kwargs)

    inner.forward = redirected
    try:
        return model()
    finally:
        restore()


def agreed_count(n: int) -> int:
    """The largest ``n`` over the ranks: every ZeRO-3 forward all-gathers, so every rank must run
    as many forwards as the others (one fewer hangs them)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return n
    count = torch.tensor([n], dtype=torch.long, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def split_to(runs: list[list[int]], count: int) -> list[list[int]]:
    """``runs`` with the longest run halved until there are ``count`` (each run keeps >= 1 group;
    every rank holds as many groups as the others, so ``count`` is always reachable)."""
    runs = list(runs)
    while len(runs) < count:
        i = max(range(len(runs)), key=lambda j: len(runs[j]))
        if len(runs[i]) < 2:
            raise RuntimeError(f"cannot split {len(runs)} packs into {count}: a rank holds fewer groups")
        half = len(runs[i]) // 2
        runs[i : i + 1] = [runs[i][:half], runs[i][half:]]
    return runs


def accumulate_dtype(model) -> torch.dtype:
    """float64 for a float64 model (exact tests), else float32."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- what the passes return
@dataclass
class Streams:
    """``(B, R)`` results of a scoring pass, on the CPU. Without teachers only ``policy``,
    ``mask`` and ``tokens`` are set."""

    policy: torch.Tensor  # old-policy log-probs
    mask: torch.Tensor  # bool, True on response tokens
    tokens: int  # decoder tokens run (padding included)
    pos: torch.Tensor | None = None  # log-probs under [prompt, r+]
    neg: torch.Tensor | None = None  # log-probs under the negative context
    weights: torch.Tensor | None = None  # clipped weights c_t
    advantages: torch.Tensor | None = None  # A_t


@dataclass
class TeacherContexts:
    """Per group (``P``), what the teacher passes insert after the prompt: ``pos_ids`` the tokens of
    ``teacher_template(r+)``; ``negatives`` which context is the negative; ``neg_ids`` the tokens of
    ``teacher_template(r-)`` where that is ``r-`` (else ``None``)."""

    negatives: list[Negative]
    pos_ids: list[list[int]]
    neg_ids: list[list[int] | None]


@dataclass
class MicroBatch:
    """Rollout rows ``rows`` of one update micro-batch; ``inputs`` is the strategy's own
    (a :class:`~cepo.packing.PackedGroups` or a padded :class:`Batch`)."""

    rows: slice
    inputs: object
    tokens: int


def sequence_advantages_per_token(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, R)``: GRPO's ``A`` on every response token (``mask``), 0 at padding."""
    return torch.where(mask, seq_adv[:, None].expand_as(mask), torch.zeros((), dtype=seq_adv.dtype))


# ----------------------------------------------------------------------------- padded batches
@dataclass
class Batch:
    """One row per rollout: ``[pad .. | context | response | .. pad]``, left-padded to the longest
    context, right-padded to ``R``, so the response occupies the same columns in every row."""

    input_ids: torch.Tensor  # (B, C + R) int64
    attention_mask: torch.Tensor  # (B, C + R) int64
    position_ids: torch.Tensor  # (B, C + R) int64, counting real tokens only (as generate does)
    targets: torch.Tensor  # (B, R) int64, -100 at padding
    mask: torch.Tensor  # (B, R) bool, True at response tokens
    images: vision.RowImages | None = None  # VL models: each row's images

    def rows(self, sl: slice) -> Batch:
        return Batch(
            self.input_ids[sl], self.attention_mask[sl], self.position_ids[sl], self.targets[sl], self.mask[sl],
            None if self.images is None else self.images[sl],
        )  # fmt: skip

    def to(self, device) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.targets, self.mask)),
            self.images,
        )


def build_batch(
    contexts: list[list[int]], responses: list[list[int]], pad_id: int, response_width: int | None = None
) -> Batch:
    """``contexts[i] + responses[i]`` rows in the :class:`Batch` layout. ``response_width`` fixes
    ``R`` (default: the longest response), so that the policy and teacher batches of the same
    rollouts give identically shaped ``(B, R)`` outputs."""
    if len(contexts) != len(responses):
        raise ValueError(f"contexts and responses: {len(contexts)} vs {len(responses)} rows")
    c_width = max(len(c) for c in contexts)
    r_width = response_width if response_width is not None else max(1, max(len(r) for r in responses))
    rows, attn, targets = [], [], []
    for c, r in zip(contexts, responses):
        left, right = c_width - len(c), r_width - len(r)
        rows.append([pad_id] * left + list(c) + list(r) + [pad_id] * right)
        attn.append([0] * left + [1] * (len(c) + len(r)) + [0] * right)
        targets.append(list(r) + [IGNORE] * right)
    input_ids = torch.tensor(rows, dtype=torch.long)
    attention_mask = torch.tensor(attn, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    targets_t = torch.tensor(targets, dtype=torch.long)
    return Batch(input_ids, attention_mask, position_ids, targets_t, targets_t != IGNORE)


def forward_logprobs(
    model,
    batch: Batch,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    return_entropy: bool = False,
    fused_head: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(B, R)`` float32 log-probs of a padded batch's response tokens (0 at padding),
    differentiable; ``(logp, entropy)`` with ``return_entropy``.

    ``model`` is a causal LM (transformers, peft, or a DeepSpeed engine around one). With
    ``fused_head`` the decoder's hidden states go through :func:`head_logprobs` (no ``(B, R, V)``
    logits); otherwise the model's logits of the last ``R + 1`` positions through
    ``cepo_kernels.token_logprobs``.
    """
    r = batch.targets.shape[1]
    if batch.images is not None:  # VL: pixels through the tower per row, 3-row positions (cepo.vision)
        hidden = vision.padded_forward_hidden(causal_lm(model), batch.input_ids, batch.attention_mask, batch.images)
        return head_logprobs(
            model, linear_token_logprobs, (hidden[:, -(r + 1) : -1, :],), batch.targets, temperature=temperature,
            return_entropy=return_entropy, backend=backend,
        )  # fmt: skip
    if fused_head:
        hidden = (
            causal_lm(model)
            .get_decoder()(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
            .last_hidden_state[:, -(r + 1) : -1, :]
        )
        return head_logprobs(
            model, linear_token_logprobs, (hidden,), batch.targets, temperature=temperature,
            return_entropy=return_entropy, backend=backend,
        )  # fmt: skip
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=r + 1,
        use_cache=False,
    )
    return cepo_kernels.token_logprobs(
        out.logits[:, :-1, :], batch.targets, temperature=temperature, return_entropy=return_entropy, backend=backend
    )


# ----------------------------------------------------------------------------- the strategies
class PackedPasses:
    """Shared-prefix packed passes (module docstring). ``cfg`` is the :class:`TrainConfig`."""

    packed = True

    def __init__(self, cfg, pad_id: int, device):
        self.cfg, self.pad_id, self.device = cfg, pad_id, device
        self.backend = cfg.scoring.kernel_backend

    # -- layout
    def split(self, sizes: list[int]) -> list[list[int]]:
        """Consecutive runs of group indices: at most ``scoring.micro_batch_tokens`` packed tokens
        per run (a larger group alone), or ``optim.micro_batch_size // G`` groups when it is 0."""
        budget = self.cfg.scoring.micro_batch_tokens
        if budget <= 0:
            k = max(1, self.cfg.optim.micro_batch_size // self.cfg.rollout.group_size)
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

    def pack(self, groups: list[Group], contexts: tuple[str, ...], width: int) -> PackedGroups:
        """The groups end to end in one row, no padding. Attention cost does not grow with the row:
        each segment attends only to its window (its ancestors and itself)."""
        return pack_groups(groups, contexts=contexts, pad_id=self.pad_id, response_width=width)

    def forward_hidden(self, model, packed: PackedGroups) -> torch.Tensor:
        """``(rows * T, D)`` final hidden states of ONE decoder forward over the pack, with tree
        attention (grad as the caller's mode)."""
        lm = causal_lm(model)
        table = packed.table.to(self.device)
        if getattr(packed, "vision", None) is not None:  # VL: tower output + 3-row positions (cepo.vision)
            hidden = packed.vision.hidden(lm, table, self.backend)
            return hidden.reshape(-1, hidden.shape[-1])
        with tree_mode(lm):
            hidden = packed_forward(lm, table, backend=self.backend)
        return hidden.reshape(-1, hidden.shape[-1])

    def gather(
        self, model, packed: PackedGroups, negatives: list[Negative] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One forward; ``(keep, targets, hidden)``: ``keep`` ``(b, R)`` bool marks the response
        tokens every stream can score, ``targets`` ``(M,)`` their ids and ``hidden[stream]``
        ``(M, D)`` the hidden states predicting them, in row-major order of ``keep``. Streams: the
        pack's contexts, and with ``negatives`` (one per response) a ``"neg"`` stream taken from
        the ``r-`` (``neg``), ``policy`` or ``pos`` context as each response's negative says."""
        flat = self.forward_hidden(model, packed)
        targets = packed.targets(IGNORE).to(flat.device)
        idx = {c: packed.predict_index(c).to(flat.device) for c in packed.contexts}
        rows_of = getattr(packed, "rows_of", None)  # teacher_image=drop: each context's copy of every response
        if rows_of is not None:
            targets = targets[rows_of["policy"].to(flat.device)]
            idx = {c: index[rows_of[c].to(flat.device)] for c, index in idx.items()}
        if negatives is not None:
            source = {Negative.R_MINUS: "neg", Negative.POLICY: "policy", Negative.R_PLUS: "pos"}
            neg = torch.full_like(targets, -1)
            for kind, ctx in source.items():
                rows = torch.tensor([n == kind for n in negatives], dtype=torch.bool, device=flat.device)
                if bool(rows.any()):
                    neg[rows] = idx[ctx][rows]
            idx["neg"] = neg
        keep = targets != IGNORE
        for index in idx.values():
            keep &= index >= 0
        hidden = {c: flat.index_select(0, index[keep]) for c, index in idx.items()}
        return keep, targets[keep], hidden

    # -- no-grad passes
    def score(self, model, rollouts, seq_adv, lam, teachers: TeacherContexts | None) -> Streams:
        G, R = rollouts.group_size, rollouts.width
        negatives = teachers.negatives if teachers else None
        with_r_minus = teachers is not None and any(n is Negative.R_MINUS for n in negatives)
        contexts = CONTEXTS if with_r_minus else (("policy", "pos") if teachers else ("policy",))
        groups = []
        for g, prompt in enumerate(rollouts.prompts):
            responses = rollouts.responses[g * G : (g + 1) * G]
            if teachers is None:
                groups.append(Group(prompt, responses))
                continue
            neg_ids = teachers.neg_ids[g] if negatives[g] is Negative.R_MINUS else None
            own = None if neg_ids is not None or not with_r_minus else ("policy", "pos")  # no r-: nothing under it
            groups.append(Group(prompt, responses, teachers.pos_ids[g], neg_ids or (), own))
        B, acc = len(rollouts.responses), accumulate_dtype(model)
        names = ("policy", "pos", "neg", "weights", "advantages") if teachers else ("policy",)
        out = {k: torch.full((B, R), 1.0 if k == "weights" else 0.0, dtype=acc) for k in names}
        mask = torch.zeros(B, R, dtype=torch.bool)
        tokens = 0
        temperature, eps_w = self.cfg.rollout.temperature, self.cfg.algorithm.eps_w
        runs = self.split([g.packed_size(contexts) for g in groups])
        runs = split_to(runs, agreed_count(len(runs)))  # the same number of forwards on every rank
        with torch.no_grad():
            for run in runs:
                if rollouts.vision is None:
                    packed = self.pack([groups[i] for i in run], contexts, R)
                else:
                    packed = vision.pack_run(self, rollouts, [groups[i] for i in run], run, contexts, R)
                tokens += packed.tokens
                rows = slice(run[0] * G, (run[-1] + 1) * G)
                neg_rows = None if teachers is None else [negatives[i] for i in run for _ in range(G)]
                keep, tgt, hidden = self.gather(model, packed, neg_rows)
                tgt = tgt[:, None]  # (M, 1): each kept token its own length-1 "sequence"
                h = {k: v[:, None, :] for k, v in hidden.items()}
                if teachers is None:
                    logp = head_logprobs(
                        model, linear_token_logprobs, (h["policy"],), tgt, temperature=temperature,
                        backend=self.backend,
                    )  # fmt: skip
                    values = {"policy": logp}
                else:
                    a_tok = seq_adv[rows][:, None].expand(keep.shape).to(tgt.device)[keep]
                    two_stream = all(n is Negative.POLICY for n in neg_rows)
                    streams = (None, h["pos"], h["policy"]) if two_stream else (h["policy"], h["pos"], h["neg"])
                    res = head_logprobs(
                        model, linear_contrastive_logprobs, streams, tgt, a_tok, lam=lam, eps_w=eps_w,
                        temperature=temperature, backend=self.backend,
                    )  # fmt: skip
                    values = {
                        "policy": res.policy if res.policy is not None else res.neg,
                        "pos": res.pos, "neg": res.neg, "weights": res.weights, "advantages": res.advantages,
                    }  # fmt: skip
                keep = keep.cpu()
                mask[rows] = keep
                for name, v in values.items():
                    out[name][rows][keep] = v[:, 0].detach().to(acc).cpu()
        return Streams(out.pop("policy"), mask, tokens, **out)

    def reference_logprobs(self, model, rollouts) -> tuple[torch.Tensor, int]:
        """``(B, R)`` no-grad log-probs of the responses under ``model`` (a frozen reference) and
        the decoder tokens run."""
        logp = torch.zeros(len(rollouts.responses), rollouts.width, dtype=accumulate_dtype(model))
        tokens = 0
        with torch.no_grad():
            for mb in self._micro_batches(rollouts, range(len(rollouts.prompts)), agree=False):
                lp, _, _ = self.policy_logprobs(model, mb, return_entropy=False)
                logp[mb.rows] = lp.to(logp.dtype).cpu()
                tokens += mb.tokens
        return logp, tokens

    # -- the update's passes
    def micro_batches(self, rollouts, rows: slice) -> list[MicroBatch]:
        """Whole groups, the same number of micro-batches on every rank (the longest split is
        agreed; shorter ones are split further)."""
        G = rollouts.group_size
        return self._micro_batches(rollouts, range(rows.start // G, rows.stop // G), agree=True)

    def _micro_batches(self, rollouts, group_ids: range, *, agree: bool) -> list[MicroBatch]:
        G, R = rollouts.group_size, rollouts.width
        groups = [Group(rollouts.prompts[g], rollouts.responses[g * G : (g + 1) * G]) for g in group_ids]
        runs = self.split([g.packed_size(("policy",)) for g in groups])
        if agree:
            runs = split_to(runs, agreed_count(len(runs)))
        first = group_ids[0]
        out = []
        for run in runs:
            if rollouts.vision is None:
                packed = self.pack([groups[i] for i in run], ("policy",), R)
            else:
                packed = vision.pack_run(self, rollouts, [groups[i] for i in run], [first + i for i in run],
                                         ("policy",), R)  # fmt: skip
            out.append(MicroBatch(slice((first + run[0]) * G, (first + run[-1] + 1) * G), packed, packed.tokens))
        return out

    def policy_logprobs(self, model, mb: MicroBatch, *, return_entropy: bool = True):
        """``(logp, entropy or None, mask)``, each ``(b, R)`` on the compute device, differentiable
        when grad is enabled; ``model`` is the engine (or any causal LM): a gradient pass runs
        inside the engine's forward (:func:`through_engine`)."""
        return through_engine(model, self._policy_logprobs, mb, return_entropy=return_entropy)

    def _policy_logprobs(self, model, mb: MicroBatch, *, return_entropy: bool = True):
        keep, tgt, hidden = self.gather(model, mb.inputs)
        res = head_logprobs(
            model, linear_token_logprobs, (hidden["policy"],), tgt, temperature=self.cfg.rollout.temperature,
            return_entropy=return_entropy, backend=self.backend,
        )  # fmt: skip
        logp, entropy = res if return_entropy else (res, None)
        zeros = torch.zeros(keep.shape, dtype=logp.dtype, device=keep.device)
        logp = zeros.masked_scatter(keep, logp)
        if entropy is not None:
            entropy = zeros.masked_scatter(keep, entropy.detach())
        return logp, entropy, keep


class PaddedPasses:
    """One padded batch per context (module docstring): the oracle for :class:`PackedPasses`."""

    packed = False

    def __init__(self, cfg, pad_id: int, device, *, fused_head: bool):
        self.cfg, self.pad_id, self.device, self.fused_head = cfg, pad_id, device, fused_head
        self.backend = cfg.scoring.kernel_backend

    def logprobs(self, model, batch: Batch, spare: Batch | None = None) -> torch.Tensor:
        """No-grad ``(B, R)`` log-probs, ``optim.micro_batch_size`` rows at a time, on the CPU.

        Under ZeRO-3 every rank runs as many forwards as the rank with the most chunks (each forward
        all-gathers): the extra ones run one row of ``batch`` (of ``spare`` when ``batch`` is empty)
        and are discarded."""
        outs, acc, mbs = [], accumulate_dtype(model), self.cfg.optim.micro_batch_size
        starts = list(range(0, batch.input_ids.shape[0], mbs))
        extra = agreed_count(len(starts)) - len(starts) if self.cfg.engine.zero_stage == 3 else 0
        kw = dict(temperature=self.cfg.rollout.temperature, backend=self.backend, fused_head=self.fused_head)
        with torch.no_grad():
            for start in starts:
                logp = forward_logprobs(model, batch.rows(slice(start, start + mbs)).to(self.device), **kw)
                outs.append(logp.to(acc).cpu())
            for _ in range(extra):
                forward_logprobs(model, (batch if starts else spare).rows(slice(0, 1)).to(self.device), **kw)
        return torch.cat(outs, 0) if outs else torch.zeros(0, batch.targets.shape[1], dtype=acc)

    def score(self, model, rollouts, seq_adv, lam, teachers: TeacherContexts | None) -> Streams:
        G, R = rollouts.group_size, rollouts.width
        contexts, responses = rollouts.contexts(), rollouts.responses
        batch = build_batch(contexts, responses, self.pad_id, response_width=R)
        batch.images = vision.row_images(rollouts)  # VL models (None otherwise)
        old = self.logprobs(model, batch)
        tokens = int(batch.input_ids.numel())
        if teachers is None:
            return Streams(old, batch.mask, tokens)
        drop = self.cfg.algorithm.teacher_image == "drop"  # VL: the reference code's image-free teacher
        bases = vision.teacher_prompts(rollouts, self.pad_id, drop)

        def run(rows: list[int], inserted: list[list[int]]) -> torch.Tensor:
            nonlocal tokens
            if not rows:  # none on this rank; under ZeRO-3 it still joins the other ranks' forwards
                return self.logprobs(model, batch.rows(slice(0, 0)), spare=batch)
            ctx = [bases[i] + list(ids) for i, ids in zip(rows, inserted)]
            b = build_batch(ctx, [responses[i] for i in rows], self.pad_id, response_width=R)
            b.images = vision.row_images(rollouts, rows, teacher=True, drop=drop)
            tokens += int(b.input_ids.numel())
            return self.logprobs(model, b)

        negatives, everyone = teachers.negatives, list(range(len(responses)))
        pos = run(everyone, rollouts.per_rollout(teachers.pos_ids))
        neg = old.clone()  # Negative.POLICY
        need = [i for i in everyone if negatives[i // G] is Negative.R_MINUS]
        neg_need = run(need, [teachers.neg_ids[i // G] for i in need])
        if need:
            neg[need] = neg_need
        same = [i for i in everyone if negatives[i // G] is Negative.R_PLUS]
        neg[same] = pos[same]  # delta = 0: A_t = A exactly
        adv, weights = contrastive_token_advantages(
            seq_adv, pos, neg, batch.mask, lam=lam, eps_w=self.cfg.algorithm.eps_w, backend=self.backend
        )
        return Streams(old, batch.mask, tokens, pos=pos, neg=neg, weights=weights, advantages=adv)

    def reference_logprobs(self, model, rollouts) -> tuple[torch.Tensor, int]:
        batch = build_batch(rollouts.contexts(), rollouts.responses, self.pad_id, response_width=rollouts.width)
        batch.images = vision.row_images(rollouts)
        return self.logprobs(model, batch), int(batch.input_ids.numel())

    def micro_batches(self, rollouts, rows: slice) -> list[MicroBatch]:
        mbs = self.cfg.optim.micro_batch_size
        batch = build_batch(
            rollouts.contexts()[rows], rollouts.responses[rows], self.pad_id, response_width=rollouts.width
        )
        batch.images = vision.row_images(rollouts, rows)
        out = []
        for i in range(0, rows.stop - rows.start, mbs):
            part = batch.rows(slice(i, i + mbs))
            out.append(MicroBatch(slice(rows.start + i, rows.start + i + mbs), part, int(part.input_ids.numel())))
        return out

    def policy_logprobs(self, model, mb: MicroBatch, *, return_entropy: bool = True):
        return through_engine(model, self._policy_logprobs, mb, return_entropy=return_entropy)

    def _policy_logprobs(self, model, mb: MicroBatch, *, return_entropy: bool = True):
        batch = mb.inputs.to(self.device)
        res = forward_logprobs(
            model, batch, temperature=self.cfg.rollout.temperature, backend=self.backend,
            return_entropy=return_entropy, fused_head=self.fused_head,
        )  # fmt: skip
        logp, entropy = res if return_entropy else (res, None)
        return logp, entropy, batch.mask


# ----------------------------------------------------------------------------- the choice, once
def packing_unavailable(cfg, model) -> str | None:
    """Why the packed passes cannot run for this config and model (``None``: they can)."""
    if cfg.scoring.kernel_backend == "cuda":
        return "scoring.kernel_backend=cuda: the CUDA extension has the logits ops only (the padded passes use them)"
    if cfg.model.gradient_checkpointing:  # the backward's recomputation would run outside tree mode (SDPA)
        return (
            "model.gradient_checkpointing=true: the packed tree attention is not re-entered when a layer is recomputed"
        )
    lm = causal_lm(model)
    reason = vision.packing_unavailable(lm) if vision.is_vl_model(lm) else hf_attention.supports(lm)
    if reason:
        return reason
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear (e.g. LoRA on lm_head)"
    return None


def fused_head_unavailable(cfg, model) -> str | None:
    """Why the padded passes must compute log-probs from the logits (``None``: the fused LM head)."""
    if cfg.scoring.kernel_backend == "cuda":
        return "scoring.kernel_backend=cuda: the CUDA extension has the logits ops only"
    head = causal_lm(model).get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    return None


def build_passes(cfg, model, pad_id: int, device, groups_per_rank: int) -> PackedPasses | PaddedPasses:
    """``scoring.packing``: ``auto`` packs where supported (and logs once why not), ``true`` raises
    where unsupported, ``false`` keeps the padded passes."""
    mode = cfg.scoring.packing
    reason = "scoring.packing=false" if mode == "false" else packing_unavailable(cfg, model)
    if reason is None and groups_per_rank % cfg.optim.updates_per_batch:
        reason = (
            f"{groups_per_rank} groups per rank do not split into optim.updates_per_batch="
            f"{cfg.optim.updates_per_batch} mini-batches of whole groups"
        )
    if reason is None:
        return PackedPasses(cfg, pad_id, device)
    if mode == "true":
        raise ValueError(f"scoring.packing=true: {reason}")
    if mode == "auto":
        log.info("scoring.packing=auto: using padded passes because %s", reason)
    return PaddedPasses(cfg, pad_id, device, fused_head=fused_head_unavailable(cfg, model) is None)
