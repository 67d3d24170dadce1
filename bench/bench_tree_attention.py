"""Benchmarks of shared-prefix packing with tree attention, in two parts:

1. ``tree_attention`` alone (forward + backward) against FlexAttention with the same tree mask and
   unshared flash SDPA (each suffix attends to its own copy of the prompt). GPU (``full``): bf16,
   16 heads / 8 KV heads, head dim 128, 24 suffixes of 512 tokens under a prompt of 1024 and 4096
   (the FlexAttention times to beat on an H100: 1.94 ms and 4.97 ms). CPU (``tiny``): fp32, 4 / 2
   heads, head dim 32, 6 suffixes of 24 under a prompt of 40: the torch backend explicit
   (``need_lse=True``) and through SDPA (``need_lse=False``) against plain SDPA with the dense mask.
2. The no-grad group pass of the trainer on a random-init Qwen3-shaped model (GPU ``full``:
   Qwen3-1.7B, 28 layers, hidden 2048, bf16; G = 8, 16-token answers r+ / r-, responses of 1024,
   prompts of 768 and 2048; CPU ``tiny``: 2 layers, hidden 64): the three log-prob passes over 3G
   padded sequences (``plain``: SDPA and the fused LM head at the response positions;
   ``plain-logits``: SDPA, full logits, then ``token_logprobs``) against one packed pass
   (``packed``: ``cepo.scoring.PackedPasses``, tree attention). Log-probs are compared first;
   ``extra_info.tokens`` is the number of tokens each runs through the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cepo_kernels as ck
from bench.conftest import CUDA, usable
from cepo_kernels.reference.tree_attention import repeat_kv

SHAPES = {
    "full": [dict(prompt=1024, n_suffix=24, suffix=512, heads=16, kv_heads=8, dim=128),
             dict(prompt=4096, n_suffix=24, suffix=512, heads=16, kv_heads=8, dim=128)],
    "tiny": [dict(prompt=40, n_suffix=6, suffix=24, heads=4, kv_heads=2, dim=32)],
}  # fmt: skip


def _cases():
    for size, shapes in SHAPES.items():
        for s in shapes:
            yield pytest.param(size, s, id=f"{size}-p{s['prompt']}-{s['n_suffix']}x{s['suffix']}-d{s['dim']}")


def _setup(shape, device):
    p, n, s = shape["prompt"], shape["n_suffix"], shape["suffix"]
    T = p + n * s
    seg = (torch.tensor([[0] + [p + i * s for i in range(n)]]), torch.tensor([[p] + [s] * n]),
           torch.tensor([[-1] + [0] * n]))  # fmt: skip
    layout = ck.tree_layout(*(t.to(device) for t in seg), T)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, shape["heads"], T, shape["dim"], device=device, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, shape["kv_heads"], T, shape["dim"], device=device, generator=g).to(dtype).requires_grad_()
            for _ in range(2))  # fmt: skip
    do = torch.randn(q.shape, device=device, generator=g).to(dtype)
    return layout, q, k, v, do


def _attn_flops(layout, shape):
    mask = layout.sdpa_mask()[0]
    pairs = float((mask[:, 0] & layout.sdpa_mask()[1][:, 0]).sum())
    return 2.0 * 2 * pairs * shape["heads"] * shape["dim"] * 3.5  # fwd (2 matmuls) + bwd (5): 3.5x fwd


@pytest.mark.parametrize("impl", ["tree-triton", "tree-torch-sdpa", "tree-torch-explicit", "flex", "sdpa-dense-mask",
                                  "sdpa-unshared"])  # fmt: skip
@pytest.mark.parametrize("size_name,shape", list(_cases()))
def test_tree_attention_fwd_bwd(measure, size, device, impl, size_name, shape):
    if size_name != size:
        pytest.skip(f"{size_name} shapes are not run at --bench-size {size}")
    layout, q, k, v, do = _setup(shape, device)
    heads = q.shape[1]
    if impl == "tree-triton":
        if not usable("triton", [q]):
            pytest.skip("triton cannot run here")
        fwd = lambda: ck.tree_attention(q, k, v, layout, backend="triton", need_lse=False)[0]  # noqa: E731
    elif impl == "tree-torch-sdpa":
        fwd = lambda: ck.tree_attention(q, k, v, layout, backend="torch", need_lse=False)[0]  # noqa: E731
    elif impl == "tree-torch-explicit":
        if device == "cuda":
            pytest.skip("the explicit reference is a CPU / fp64 path")
        fwd = lambda: ck.tree_attention(q, k, v, layout, backend="torch")[0]  # noqa: E731
    elif impl == "sdpa-dense-mask":
        mask, seen = layout.sdpa_mask()
        fwd = lambda: F.scaled_dot_product_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), attn_mask=mask)  # noqa: E731
    elif impl == "flex":
        if device != "cuda":
            pytest.skip("FlexAttention is compiled by inductor: GPU only here")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        seg, depth, anc = layout.seg[0], layout.depth[0], layout.anc[0]

        def mask_mod(b, h, qi, ki):
            sk = seg[ki]
            return (sk >= 0) & (anc[depth[ki], qi] == sk) & ((sk != seg[qi]) | (ki <= qi))

        T = q.shape[2]
        block_mask = create_block_mask(mask_mod, 1, None, T, T, device=device)
        flex = torch.compile(flex_attention)
        fwd = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)  # noqa: E731
    else:  # sdpa-unshared: every suffix with its own copy of the prompt, causal flash attention
        p, n, s = shape["prompt"], shape["n_suffix"], shape["suffix"]

        def fwd():
            pre_q, pre_k, pre_v = (x[:, :, :p] for x in (q, k, v))
            suf = [x[:, :, p:].reshape(x.shape[0], x.shape[1], n, s, x.shape[3]) for x in (q, k, v)]
            qq, kk, vv = (torch.cat([pre.unsqueeze(2).expand(-1, -1, n, -1, -1), sx], 3).transpose(1, 2)
                          .reshape(n, x.shape[1], p + s, x.shape[3])
                          for pre, sx, x in zip((pre_q, pre_k, pre_v), suf, (q, k, v)))  # fmt: skip
            return F.scaled_dot_product_attention(qq, repeat_kv(kk, heads), repeat_kv(vv, heads), is_causal=True)

    def fwd_bwd():
        out = fwd()
        return torch.autograd.grad(out, (q, k, v), do if out.shape == do.shape else torch.ones_like(out))

    check = None
    if impl.startswith("tree") or impl == "flex":
        ref_out = ck.tree_attention(q, k, v, layout, backend="torch", need_lse=False)[0].float()

        def check():
            got = fwd().float()
            torch.testing.assert_close(got, ref_out, atol=2e-2, rtol=2e-2)

    group = f"tree_attention_fwd_bwd[{size_name}-p{shape['prompt']}-d{shape['dim']}]"
    rounds = 10 if device == "cuda" else 3
    measure(group, impl, fwd_bwd, check=check, flops=_attn_flops(layout, shape), interpreted=impl == "tree-triton",
            rounds=rounds)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 2. the no-grad group pass of the trainer

GROUP_SHAPES = {
    "full": dict(layers=28, hidden=2048, ffn=6144, heads=16, kv_heads=8, head_dim=128, vocab=151936,
                 G=8, answer=16, response=1024, prompts=(768, 2048)),
    "tiny": dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=1000,
                 G=4, answer=4, response=16, prompts=(24,)),
}  # fmt: skip
_MODELS: dict = {}


def qwen3_model(size: str, device: str):
    """A random-init Qwen3-shaped causal LM (bf16 on a GPU, fp32 on a CPU), built once per size."""
    if size not in _MODELS:
        import transformers

        s = GROUP_SHAPES[size]
        config = transformers.Qwen3Config(
            num_hidden_layers=s["layers"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
            vocab_size=s["vocab"], max_position_embeddings=8192, tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.Qwen3ForCausalLM(config)
        _MODELS[size] = model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    return _MODELS[size]


def _group_cases():
    for size, s in GROUP_SHAPES.items():
        for prompt in s["prompts"]:
            for impl in ("plain", "plain-logits", "packed"):
                yield pytest.param(size, prompt, impl, id=f"{size}-p{prompt}-{impl}")


@pytest.mark.parametrize("size_name,prompt,impl", list(_group_cases()))
def test_group_pass_no_grad(measure, size, device, size_name, prompt, impl):
    if size_name != size:
        pytest.skip(f"{size_name} shapes are not run at --bench-size {size}")
    from cepo import hf_attention
    from cepo.advantages import Negative
    from cepo.config import DataConfig, ModelConfig, TrainConfig
    from cepo.experience import Rollouts
    from cepo.packing import CONTEXTS, Group, unshared_sequences
    from cepo.scoring import PackedPasses, TeacherContexts

    s = GROUP_SHAPES[size]
    G, answer, response = s["G"], s["answer"], s["response"]
    model = qwen3_model(size, device)
    gen = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(0, s["vocab"], (n,), generator=gen).tolist()

    group = Group(toks(prompt), [toks(response) for _ in range(G)], toks(answer), toks(answer))
    weight = model.get_output_embeddings().weight
    seqs = {c: torch.tensor(unshared_sequences(group, c), device=device) for c in CONTEXTS}
    targets = torch.tensor([list(r) for r in group.responses], device=device)

    def plain():  # SDPA, then the fused LM head at the response positions
        out = {}
        with torch.no_grad():
            for c in CONTEXTS:
                ids = seqs[c]
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                ctx = ids.shape[1] - response
                h = hidden[:, ctx - 1 : ctx - 1 + response]
                out[c] = ck.linear_token_logprobs(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1))
                out[c] = out[c].view(G, response)
        return out

    def plain_logits():  # the stock way: full logits of every position, then the response log-probs
        out = {}
        with torch.no_grad():
            for c in CONTEXTS:
                ids = seqs[c]
                ctx = ids.shape[1] - response
                logits = model(input_ids=ids, use_cache=False).logits
                out[c] = ck.token_logprobs(logits[:, ctx - 1 : ctx - 1 + response], targets)
                del logits
        return out

    # the trainer's own packed experience pass: one forward, one three-stream LM-head call
    cfg = TrainConfig(model=ModelConfig(path="-"), data=DataConfig(train_file="-"))
    cfg.rollout.group_size, cfg.optim.micro_batch_size = G, G
    passes = PackedPasses(cfg, pad_id=0, device=device)
    rollouts = Rollouts([group.prompt], [list(r) for r in group.responses], [""] * G, [""], [""], G)
    teachers = TeacherContexts([Negative.R_MINUS], [group.pos_answer], [group.neg_answer])
    seq_adv = torch.linspace(-1.0, 1.0, G)

    def packed():
        return passes.score(model, rollouts, seq_adv, 1.0, teachers)

    def check():
        model.set_attn_implementation("sdpa")
        want = plain()
        hf_attention.enable(model)
        got = packed()
        for c in CONTEXTS:
            diff = (getattr(got, c)[:, :response].to(want[c].device) - want[c]).abs()
            # bf16 model: the two paths round differently; close on average, bounded at worst
            bound = (5e-2, 1.0) if device == "cuda" else (1e-4, 1e-3)
            assert diff.mean().item() <= bound[0] and diff.max().item() <= bound[1], (
                f"packed vs plain {c}: mean |diff| {diff.mean().item():.3g}, max {diff.max().item():.3g}"
            )

    fn = {"plain": plain, "plain-logits": plain_logits, "packed": packed}[impl]
    tokens = sum(x.numel() for x in seqs.values()) if impl != "packed" else prompt + 2 * answer + 3 * G * response

    def switched_check():  # the check switches attention; the timed call runs with impl's own
        check()
        if impl == "packed":
            hf_attention.enable(model)
        else:
            model.set_attn_implementation("sdpa")

    measure(f"group_pass_no_grad[{size_name}-p{prompt}]", impl, fn, check=switched_check, tokens=tokens,
            rounds=5 if CUDA else 2, layers=s["layers"], G=G, response=response)  # fmt: skip
