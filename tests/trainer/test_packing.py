"""Shared-prefix packing and the trainer's packed passes (``cepo.scoring.PackedPasses``, the code
``cepo train`` runs) on tiny random-init Qwen2 / Qwen3 / Llama models (float64): packed log-probs and
gradients equal the unshared padded computation; naive packing does not."""

from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cepo import hf_attention  # noqa: E402
from cepo.advantages import Negative  # noqa: E402
from cepo.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from cepo.experience import Rollouts  # noqa: E402
from cepo.packing import CONTEXTS, Group, pack_groups, unshared_sequences  # noqa: E402
from cepo.scoring import PackedPasses, TeacherContexts, head_logprobs  # noqa: E402
from cepo_kernels.linear_token_logprobs import linear_token_logprobs  # noqa: E402

VOCAB = 50


def _rms_norm_fp64(self, hidden_states):
    """RMSNorm kept in the input dtype: the stock one computes in float32 even for a float64 model,
    whose rounding (1e-7) would differ between packed and unshared gradient sums."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _exact_float64(model):
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = _rms_norm_fp64.__get__(module)
    return model


def tiny_model(family: str, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        config = transformers.Qwen3Config(head_dim=8, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = _exact_float64(cls(config).double().eval())
    # random, non-trivial norms and biases so no parameter's gradient is structurally tiny
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def sdpa_copy(model):
    """The same weights with the stock SDPA attention: the unshared baseline."""
    other = _exact_float64(type(model)(copy.deepcopy(model.config)).double().eval())
    other.load_state_dict(model.state_dict())
    other.set_attn_implementation("sdpa")
    return other


def random_groups(seed: int, n_groups: int = 2, G: int = 3) -> list[Group]:
    """Odd lengths, one-token and empty answers, one-token responses."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(VOCAB) for _ in range(n)]

    groups = []
    for gi in range(n_groups):
        responses = [toks(rng.choice([1, 3, 4, 7])) for _ in range(G)]
        pos = toks(rng.choice([0, 1, 2, 5])) if gi else toks(3)
        neg = toks(rng.choice([0, 1, 3])) if gi else []
        groups.append(Group(prompt=toks(rng.choice([1, 5, 8])), responses=responses, pos_answer=pos, neg_answer=neg))
    return groups


def unshared_logprobs(model, groups, context, width):
    """(N, width) response log-probs from one right-padded batch of ``[prompt, (r+|r-), response]``
    sequences through the stock model (2-D attention mask, default positions)."""
    seqs, resp = [], []
    for g in groups:
        seqs += unshared_sequences(g, context)
        resp += [list(r) for r in g.responses]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    for n, s in enumerate(seqs):
        ids[n, : len(s)] = torch.tensor(s)
        att[n, : len(s)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits, -1)
    out = torch.zeros(len(seqs), width, dtype=logp.dtype)
    for n, (s, r) in enumerate(zip(seqs, resp)):
        ctx = len(s) - len(r)
        for t, y in enumerate(r):
            if ctx + t >= 1:
                out[n, t] = logp[n, ctx + t - 1, y]
    return out


def make_passes(G: int, *, groups_per_micro_batch: int = 1, micro_batch_tokens: int = 0, backend: str = "torch"):
    """The trainer's packed passes for groups of ``G``: ``groups_per_micro_batch`` groups per
    micro-batch, or at most ``micro_batch_tokens`` packed tokens per micro-batch when > 0."""
    cfg = TrainConfig(model=ModelConfig(path="-"), data=DataConfig(train_file="-"))
    cfg.rollout.group_size = G
    cfg.optim.micro_batch_size = G * groups_per_micro_batch
    cfg.scoring.micro_batch_tokens = micro_batch_tokens
    cfg.scoring.kernel_backend = backend
    return PackedPasses(cfg, pad_id=0, device="cuda" if torch.cuda.is_available() else "cpu")


def as_rollouts(groups: list[Group]) -> Rollouts:
    G = len(groups[0].responses)
    assert all(len(g.responses) == G for g in groups)
    P = len(groups)
    responses = [list(r) for g in groups for r in g.responses]
    return Rollouts([list(g.prompt) for g in groups], responses, [""] * len(responses), [""] * P, [""] * P, G)


def score_groups(model, groups: list[Group], **passes_kw):
    """``PackedPasses.score`` with every group's negative its ``r-``: the ``(N, R)`` streams."""
    passes = make_passes(len(groups[0].responses), **passes_kw)
    rollouts = as_rollouts(groups)
    teachers = TeacherContexts(
        [Negative.R_MINUS] * len(groups), [list(g.pos_answer) for g in groups], [list(g.neg_answer) for g in groups]
    )
    seq_adv = torch.linspace(-1.0, 1.0, len(rollouts.responses))
    return passes.score(model, rollouts, seq_adv, 0.5, teachers)


def stream(streams, ctx: str) -> torch.Tensor:
    return getattr(streams, ctx)


def context_logprobs(passes: PackedPasses, model, packed) -> dict[str, torch.Tensor]:
    """``{context: (M,)}`` log-probs of the pack's response tokens, by the trainer's gather."""
    _, tgt, hidden = passes.gather(model, packed)
    return {c: head_logprobs(model, linear_token_logprobs, (hidden[c],), tgt) for c in packed.contexts}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize(
    "layout", [dict(groups_per_micro_batch=2), dict(micro_batch_tokens=1)], ids=["two-groups", "a-group-each"]
)
def test_packed_logprobs_match_unshared(family, layout):
    model = hf_attention.enable(tiny_model(family))
    groups = random_groups(1, n_groups=3)
    got = score_groups(model, groups, **layout)
    base = sdpa_copy(model)
    with torch.no_grad():
        for ctx in CONTEXTS:
            want = unshared_logprobs(base, groups, ctx, got.mask.shape[1])
            assert (stream(got, ctx) - want).abs().max() < 1e-10, ctx
    assert got.policy.dtype == torch.float64
    assert bool((got.policy[~got.mask] == 0).all())
    # the test would notice: teachers differ from the policy where an answer is present
    assert (got.pos - got.policy).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_packed_update_gradients_match_unshared(family):
    model = hf_attention.enable(tiny_model(family, seed=3))
    groups = random_groups(4, n_groups=2, G=4)
    passes, rollouts = make_passes(4, micro_batch_tokens=48), as_rollouts(groups)
    micro = passes.micro_batches(rollouts, slice(0, len(rollouts.responses)))
    assert len(micro) == 2  # the token budget splits the two groups
    logp = torch.zeros(len(rollouts.responses), rollouts.width, dtype=torch.float64)
    mask = torch.zeros(logp.shape, dtype=torch.bool)
    for mb in micro:
        lp, _, keep = passes.policy_logprobs(model, mb, return_entropy=False)
        logp = logp.index_put((torch.arange(mb.rows.start, mb.rows.stop),), lp)
        mask[mb.rows] = keep
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (logp * weights * mask).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    base = sdpa_copy(model)
    want = unshared_logprobs(base, groups, "policy", logp.shape[1])
    (want * weights * mask).sum().backward()
    assert (logp.detach() - want.detach()).abs().max() < 1e-10
    for n, p in base.named_parameters():
        assert p.grad is not None and packed_grads[n].abs().max() > 0, n
        assert (packed_grads[n] - p.grad).abs().max() < 1e-8, n


def test_permuting_groups_or_rollouts_changes_nothing():
    model = hf_attention.enable(tiny_model("qwen3", seed=7))
    groups = random_groups(8, n_groups=3, G=3)
    ref = score_groups(model, groups, groups_per_micro_batch=3)
    # groups in another order (and grouped differently into micro-batches)
    order = [2, 0, 1]
    got = score_groups(model, [groups[i] for i in order], micro_batch_tokens=60)
    offsets = [0, 3, 6]
    back = torch.cat([torch.arange(offsets[i], offsets[i] + 3) for i in order])
    for ctx in CONTEXTS:
        a, b = stream(ref, ctx)[back], stream(got, ctx)
        assert (a[:, : b.shape[1]] - b[:, : a.shape[1]]).abs().max() < 1e-12, ctx
    # rollouts of a group reversed
    perm_groups = [Group(g.prompt, list(reversed(g.responses)), g.pos_answer, g.neg_answer) for g in groups]
    got = score_groups(model, perm_groups, groups_per_micro_batch=3)
    back = torch.tensor([2, 1, 0, 5, 4, 3, 8, 7, 6])
    for ctx in CONTEXTS:
        assert (stream(ref, ctx)[back] - stream(got, ctx)).abs().max() < 1e-12, ctx


@pytest.mark.parametrize("naive", ["positions-restart", "suffix-from-prompt-length"])
def test_naive_packing_gives_different_logprobs(naive):
    """Packing with wrong position ids changes the result, so the equality tests can fail."""
    model = hf_attention.enable(tiny_model("qwen3", seed=9))
    groups = [Group([1, 2, 3, 4, 5], [[6, 7, 8], [9, 10]], pos_answer=[11, 12, 13], neg_answer=[14, 15])]
    passes = make_passes(2)
    packed = passes.pack(groups, CONTEXTS, 3)
    with torch.no_grad():
        good = context_logprobs(passes, model, packed)
        table = packed.table
        if naive == "positions-restart":
            cols = torch.arange(table.input_ids.shape[1])
            seg = table.layout().seg[0].long()
            table.position_ids = (cols - table.seg_start[0, seg.clamp(min=0)]).clamp(min=0)[None]
        else:  # every suffix numbered from the prompt's end, ignoring r+ / r-
            plen = len(groups[0].prompt)
            for s in range(table.seg_start.shape[1]):
                a, n = int(table.seg_start[0, s]), int(table.seg_len[0, s])
                if int(table.seg_parent[0, s]) >= 0:
                    table.position_ids[0, a : a + n] = torch.arange(plen, plen + n)
        bad = context_logprobs(passes, model, packed)
    changed = "pos" if naive == "suffix-from-prompt-length" else "policy"
    assert (bad[changed] - good[changed]).abs().max() > 1e-4


def test_pack_groups_table_and_predict_index():
    groups = [Group([1, 2, 3], [[4, 5], [6]], pos_answer=[7, 8], neg_answer=[]), Group([9], [[10, 11, 12]], [13], [14])]
    packed = pack_groups(groups)
    t = packed.table
    # group 0: 3 + 2 + 0 + 3 * (2 + 1) = 14 tokens; group 1: 1 + 1 + 1 + 3 * 3 = 12, end to end in one row
    assert t.input_ids.shape == (1, 26)
    row0 = t.input_ids[0].tolist()
    assert row0[:5] == [1, 2, 3, 7, 8]
    # segments of group 0: prompt, r+, r- (empty), policy y1 y2, pos y1 y2, neg y1 y2
    assert t.seg_len[0].tolist()[:9] == [3, 2, 0, 2, 1, 2, 1, 2, 1]
    assert t.seg_parent[0].tolist()[:9] == [-1, 0, 0, 0, 0, 1, 1, 2, 2]
    assert t.seg_pos[0].tolist()[:9] == [0, 3, 3, 3, 3, 5, 5, 3, 3]
    assert t.position_ids[0, :5].tolist() == [0, 1, 2, 3, 4]
    # policy y1 at columns 5, 6: predicted from the prompt's last token (col 2) then col 5
    idx = packed.predict_index("policy")
    assert idx[0, :2].tolist() == [2, 5] and idx[0, 2].item() == -1
    # pos y1 (cols 8, 9) predicted from r+'s last token (col 4); neg (empty r-) from the prompt's
    assert packed.predict_index("pos")[0, :2].tolist() == [4, 8]
    assert packed.predict_index("neg")[0, :2].tolist() == [2, 11]
    assert packed.targets()[2].tolist() == [10, 11, 12]
    # group 1 from column 14: prompt 14, r+ 15, r- 16, its policy response at 17-19
    assert packed.predict_index("policy")[2, :3].tolist() == [14, 17, 18]
    assert t.seg_parent[0].tolist()[9:12] == [-1, 9, 9]  # group 1's answers hang off its own prompt


def test_refuses_combinations_that_attend_across_segments():
    model = tiny_model("qwen3")
    packed = pack_groups(random_groups(2, n_groups=1))
    with pytest.raises(ValueError, match="attn_implementation"):
        hf_attention.packed_forward(model, packed.table)  # still sdpa
    hf_attention.enable(model)
    with pytest.raises(ValueError, match="attention_mask"):
        hf_attention.packed_forward(model, packed.table, attention_mask=torch.ones_like(packed.table.input_ids))
    with pytest.raises(ValueError, match="attention mask was passed"):
        model(
            input_ids=packed.table.input_ids,
            position_ids=packed.table.position_ids,
            attention_mask=torch.ones_like(packed.table.input_ids),
            tree_segments=packed.table.layout(),
        )
    with pytest.raises(ValueError, match="flash-attention packing"):
        model(
            input_ids=packed.table.input_ids,
            position_ids=packed.table.position_ids,
            tree_segments=packed.table.layout(),
            cu_seq_lens_q=torch.tensor([0, 4]),
        )
    with pytest.raises(ValueError, match="tree_segments"):
        model(input_ids=packed.table.input_ids)
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="supports"):
        hf_attention.enable(mistral)


def test_triton_backend_through_the_model_matches_torch():
    """The Triton kernel (interpreter on CPU) inside a float32 Qwen3 forward agrees with the torch path."""
    model = hf_attention.enable(tiny_model("qwen3", seed=11)).float()
    groups = random_groups(12, n_groups=2, G=2)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    a = score_groups(model, groups, groups_per_micro_batch=2, backend="torch")
    b = score_groups(model, groups, groups_per_micro_batch=2, backend="triton")
    for ctx in (*CONTEXTS, "weights", "advantages"):
        assert (stream(a, ctx) - stream(b, ctx)).abs().max() < 1e-4, ctx


def test_empty_prompt_answers_and_responses_match_unshared():
    model = hf_attention.enable(tiny_model("qwen3", seed=13))
    groups = [Group([], [[1, 2, 3], [], [4]], [5, 6], [7]), Group([8, 9], [[], [10], [11]], [], [])]
    got = score_groups(model, groups, micro_batch_tokens=30)
    base = sdpa_copy(model)
    with torch.no_grad():
        for ctx in CONTEXTS:
            want = unshared_logprobs(base, groups, ctx, got.mask.shape[1])
            assert (stream(got, ctx) - want)[got.mask].abs().max() < 1e-10, ctx
            assert bool((stream(got, ctx)[~got.mask] == 0).all()), ctx
    # 6 response tokens; nothing precedes the first token of an empty prompt's responses under the
    # policy, so those two are scored under no context (a token counts only where every stream has it)
    assert got.mask.sum().item() == 4
    assert not got.mask[0, 0] and not got.mask[2, 0] and got.mask[0, 1]
    assert got.weights[0, 0].item() == 1.0 and got.advantages[0, 0].item() == 0.0
