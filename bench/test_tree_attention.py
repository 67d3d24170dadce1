"""Benchmarks of ``tree_attention`` (forward + backward) against FlexAttention with the same tree
mask and unshared flash SDPA (each suffix attends to its own copy of the prompt).

GPU (``full``): bf16, 16 heads / 8 KV heads, head dim 128, 24 suffixes of 512 tokens under a
prompt of 1024 and 4096 (``../shared/ANCHORS.md``: FlexAttention 1.94 ms and 4.97 ms on H100).
CPU (``tiny``): fp32, 4 / 2 heads, head dim 32, 6 suffixes of 24 under a prompt of 40: the torch
backend explicit (``need_lse=True``) and through SDPA (``need_lse=False``) against plain SDPA with
the dense mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cepo_kernels as ck
from bench.conftest import usable
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
