"""Benchmark: shared-prefix packing + tree attention vs the plain passes (GPU only).

Two parts, side by side in one run (see docs/tree_attention.md and issue 4 for the targets):

1. ``attention``: attention alone, fwd+bwd, one prompt of P tokens and 24 suffixes of 512 (Qwen3-1.7B
   heads: 16 query heads, 8 key/value heads, head dim 128, bf16):
   ``tree`` (this kernel, one packed row) vs ``flex`` (PyTorch FlexAttention, compiled, the same
   mask from the same layout) vs ``sdpa-unshared`` (flash SDPA over 24 causal sequences of P + 512).
2. ``group-pass``: a random-init Qwen3-1.7B-shaped model (28 layers, hidden 2048, bf16), G=8,
   16-token answers r+/r-, responses of 1024, prompts 768 and 2048: the three no-grad log-prob
   passes over 3G sequences (``plain``: SDPA, the fused LM head only at response positions;
   ``plain-logits``: SDPA, full logits, then the response log-probs) vs one packed pass
   (``packed``, tree attention): tokens, time, peak memory. Log-probs are compared first.

Run: ``python bench/bench_tree_attention.py [--quick] [--out DIR]``. Appends one JSON line per
case to ``bench/results/<gpu>.jsonl``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402


def _timed_long(fn, reps: int = 5) -> dict:
    """Median / p20 / p80 of ``reps`` calls after one warm-up (for calls of 100s of ms)."""
    fn()
    common.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        common.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


# ---------------------------------------------------------------------------------------------
# 1. attention alone


def bench_attention(prompt: int, n_suffix: int, suffix: int, heads: int, kv_heads: int, dim: int, out_dir):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from cepo_kernels.tree_attention import tree_attention, tree_layout

    dev, dt = "cuda", torch.bfloat16
    T = prompt + n_suffix * suffix
    seg_start = torch.tensor([[0] + [prompt + i * suffix for i in range(n_suffix)]], device=dev)
    seg_len = torch.tensor([[prompt] + [suffix] * n_suffix], device=dev)
    seg_parent = torch.tensor([[-1] + [0] * n_suffix], device=dev)
    layout = tree_layout(seg_start, seg_len, seg_parent, T)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, heads, T, dim, device=dev, dtype=dt, generator=g).requires_grad_()
    k = torch.randn(1, kv_heads, T, dim, device=dev, dtype=dt, generator=g).requires_grad_()
    v = torch.randn(1, kv_heads, T, dim, device=dev, dtype=dt, generator=g).requires_grad_()
    do = torch.randn(1, heads, T, dim, device=dev, dtype=dt, generator=g)

    seg, depth, anc = layout.seg.long(), layout.depth.long(), layout.anc.long()

    def mask_mod(b, h, qi, ki):
        sk = seg[b, ki]
        return (sk >= 0) & (anc[b, depth[b, ki], qi] == sk) & ((sk != seg[b, qi]) | (ki <= qi))

    block_mask = create_block_mask(mask_mod, 1, None, T, T, device=dev)
    flex = torch.compile(flex_attention)

    def run_tree():
        o, _ = tree_attention(q, k, v, layout)
        torch.autograd.grad(o, (q, k, v), do)

    def run_flex():
        o = flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        torch.autograd.grad(o, (q, k, v), do)

    # unshared: n_suffix causal sequences [prompt, suffix_i]
    L = prompt + suffix
    qu = torch.randn(n_suffix, heads, L, dim, device=dev, dtype=dt, generator=g).requires_grad_()
    ku = torch.randn(n_suffix, heads, L, dim, device=dev, dtype=dt, generator=g).requires_grad_()
    vu = torch.randn(n_suffix, heads, L, dim, device=dev, dtype=dt, generator=g).requires_grad_()
    dou = torch.randn(n_suffix, heads, L, dim, device=dev, dtype=dt, generator=g)

    def run_sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qu, ku, vu, is_causal=True)
        torch.autograd.grad(o, (qu, ku, vu), dou)

    # correctness before timing: tree vs flex (both bf16) and vs the fp32 reference on a slice
    with torch.no_grad():
        o_tree, lse_tree = tree_attention(q, k, v, layout)
        o_flex = flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    common.assert_close("tree vs flex output", o_tree, o_flex, atol=2e-2, rtol=2e-2)
    go_tree = torch.autograd.grad(tree_attention(q, k, v, layout)[0], (q, k, v), do)
    go_flex = torch.autograd.grad(flex(q, k, v, block_mask=block_mask, enable_gqa=True), (q, k, v), do)
    for name, a, b in zip(("dq", "dk", "dv"), go_tree, go_flex):
        scale = b.float().abs().max().item()
        common.assert_close(f"tree vs flex {name}", a / scale, b / scale, atol=2e-2)

    rows = []
    flops = 4 * heads * dim * (n_suffix * (prompt * suffix + suffix * suffix / 2) + prompt * prompt / 2) * 3.5
    for name, fn in (("tree", run_tree), ("flex", run_flex), ("sdpa-unshared", run_sdpa)):
        t = common.timed(fn)
        mem = common.peak_extra_memory(fn)
        case = {
            "bench": "tree_attention",
            "part": "attention-fwd-bwd",
            "impl": name,
            "prompt": prompt,
            "n_suffix": n_suffix,
            "suffix": suffix,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": dim,
            "dtype": "bf16",
            **t,
            "tflops_tree_mask": flops / (t["median_ms"] * 1e-3) / 1e12,
            "peak_extra_bytes": mem,
        }
        rows.append(common.record(case, out_dir))
    return rows


# ---------------------------------------------------------------------------------------------
# 2. the group pass on a Qwen3-1.7B-shaped model


def qwen3_model(quick: bool):
    import transformers

    if quick:
        shape = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64, vocab_size=32000)  # fmt: skip
    else:
        shape = dict(num_hidden_layers=28, hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936)  # fmt: skip
    config = transformers.Qwen3Config(max_position_embeddings=8192, tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    return model


def bench_group_pass(model, prompt: int, G: int, answer: int, response: int, out_dir):
    from cepo import hf_attention
    from cepo.advantages import Negative
    from cepo.config import DataConfig, ModelConfig, TrainConfig
    from cepo.experience import Rollouts
    from cepo.packing import CONTEXTS, Group, unshared_sequences
    from cepo.scoring import PackedPasses, TeacherContexts
    from cepo_kernels.linear_token_logprobs import linear_token_logprobs

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    group = Group(toks(prompt), [toks(response) for _ in range(G)], toks(answer), toks(answer))
    fn = linear_token_logprobs
    weight = model.get_output_embeddings().weight

    def use(impl):  # one model, its attention switched between the phases (outside the timings)
        if impl == "sdpa":
            model.set_attn_implementation("sdpa")
        else:
            hf_attention.enable(model)

    seqs = {c: torch.tensor(unshared_sequences(group, c), device="cuda") for c in CONTEXTS}
    targets = torch.tensor([list(r) for r in group.responses], device="cuda")

    def plain():
        out = {}
        with torch.no_grad():
            for c in CONTEXTS:
                ids = seqs[c]
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                ctx = ids.shape[1] - response
                h = hidden[:, ctx - 1 : ctx - 1 + response]
                out[c] = fn(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1)).view(G, response)
        return out

    def plain_logits():  # the stock way: full logits of every position, then the response log-probs
        import cepo_kernels

        out = {}
        with torch.no_grad():
            for c in CONTEXTS:
                ids = seqs[c]
                ctx = ids.shape[1] - response
                logits = model(input_ids=ids, use_cache=False).logits
                out[c] = cepo_kernels.token_logprobs(logits[:, ctx - 1 : ctx - 1 + response], targets)
                del logits
        return out

    # the trainer's own packed experience pass: one forward, one three-stream LM-head call
    cfg = TrainConfig(model=ModelConfig(path="-"), data=DataConfig(train_file="-"))
    cfg.rollout.group_size, cfg.optim.micro_batch_size = G, G
    passes = PackedPasses(cfg, pad_id=0, device="cuda")
    rollouts = Rollouts([group.prompt], [list(r) for r in group.responses], [""] * G, [""], [""], G)
    teachers = TeacherContexts([Negative.R_MINUS], [group.pos_answer], [group.neg_answer])
    seq_adv = torch.linspace(-1.0, 1.0, G)

    def packed():
        return passes.score(model, rollouts, seq_adv, 1.0, teachers)

    use("sdpa")
    want = plain()
    use("tree")
    got = packed()
    for c in CONTEXTS:
        diff = (getattr(got, c)[:, :response].to(want[c].device) - want[c]).abs()
        # bf16 model: the two paths round differently; require close on average, bounded at worst
        if diff.mean().item() > 5e-2 or diff.max().item() > 1.0:
            raise AssertionError(
                f"packed vs plain {c}: mean |diff| {diff.mean().item():.3g}, max {diff.max().item():.3g}"
            )
    plain_tokens = sum(s.numel() for s in seqs.values())
    packed_tokens = prompt + 2 * answer + 3 * G * response
    rows = []
    impls = (("plain", plain, plain_tokens), ("plain-logits", plain_logits, plain_tokens))
    for name, f, n_tok in (*impls, ("packed", packed, packed_tokens)):
        use("tree" if name == "packed" else "sdpa")
        t = _timed_long(f)
        mem = common.peak_extra_memory(f)
        case = {
            "bench": "tree_attention",
            "part": "group-pass-no-grad",
            "impl": name,
            "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size,
            "prompt": prompt,
            "G": G,
            "answer": answer,
            "response": response,
            "tokens": n_tok,
            "dtype": "bf16",
            **t,
            "peak_extra_bytes": mem,
        }
        rows.append(common.record(case, out_dir))
    return rows


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_tree_attention: needs a CUDA GPU (Triton kernels, FlexAttention, flash SDPA); nothing run.")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    attn_prompts = (256,) if args.quick else (1024, 4096)
    for prompt in attn_prompts:
        rows += bench_attention(prompt, 6 if args.quick else 24, 128 if args.quick else 512, 16, 8, 128, args.out)
    model = qwen3_model(args.quick)
    for prompt in (128,) if args.quick else (768, 2048):
        rows += bench_group_pass(model, prompt, 8, 16, 128 if args.quick else 1024, args.out)
    common.print_table(
        rows,
        ["part", "impl", "prompt", "tokens", "median_ms", "p20_ms", "p80_ms", "peak_extra_bytes", "tflops_tree_mask"],
    )
    by = {(r["part"], r["prompt"], r["impl"]): r for r in rows}
    for (part, prompt, impl), r in by.items():
        for baseline in ("plain", "plain-logits") if impl == "packed" else ():
            base = by[(part, prompt, baseline)]
            mem = r["peak_extra_bytes"], base["peak_extra_bytes"]
            mem_ratio = f"{mem[0] / mem[1]:.2f}x" if None not in mem and mem[1] else "n/a"
            print(
                f"prompt {prompt}: packed vs {baseline}: token ratio {base['tokens'] / r['tokens']:.2f}x, "
                f"speed-up {base['median_ms'] / r['median_ms']:.2f}x, peak memory {mem_ratio} of {baseline}"
            )
        if impl == "tree":
            for other in ("flex", "sdpa-unshared"):
                o = by[(part, prompt, other)]
                print(
                    f"attention prompt {prompt}: speed-up of tree over {other}: {o['median_ms'] / r['median_ms']:.2f}x"
                )
    print("reproduce: python bench/bench_tree_attention.py" + (" --quick" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
