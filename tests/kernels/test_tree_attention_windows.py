"""The segment-window path of ``tree_attention`` (torch backend, ``need_lse=False``) against the
dense-mask paths, in float64, on random segment tables and on real CEPO packs."""

from __future__ import annotations

import random

import pytest
import torch

from cepo_kernels.reference.tree_attention import TreeLayout, tree_attention_forward, tree_attention_sdpa
from cepo_kernels.reference.tree_attention_windows import segment_windows, tree_attention_windows
from tests.kernels.test_tree_attention import random_table


def _qkv(seed, batch, heads, kv_heads, T, D):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, h, T, D, generator=g, dtype=torch.float64).requires_grad_(True)
        for h in (heads, kv_heads, kv_heads)
    ]


def _check(layout, q, k, v, scale):
    want, _ = tree_attention_forward(q, k, v, layout, scale)
    dense = tree_attention_sdpa(q, k, v, layout, scale)
    got = tree_attention_windows(q, k, v, layout, scale)
    assert (got - want).abs().max().item() < 1e-12
    assert (got - dense).abs().max().item() < 1e-12
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert bool(torch.isfinite(a).all()) and (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize("seed,heads,kv_heads", [(1, 4, 2), (2, 3, 1), (3, 2, 2)], ids=["gqa2", "mqa", "mha"])
def test_windows_match_dense_on_random_tables(seed, heads, kv_heads):
    T = 37
    layout = TreeLayout(*random_table(seed, 3, T), T)
    _check(layout, *_qkv(seed, 3, heads, kv_heads, T, 8), 0.4)


def test_windows_match_dense_on_cepo_packs_and_are_cached():
    from cepo.packing import Group, pack_groups

    rng = random.Random(5)

    def toks(n):
        return [rng.randrange(50) for _ in range(n)]

    groups = [
        Group(toks(rng.choice([0, 1, 6])), [toks(rng.choice([0, 1, 4, 9])) for _ in range(3)], toks(2), toks(3))
        for _ in range(5)
    ]
    groups[1].contexts = ("policy", "pos")  # a group without r-
    packed = pack_groups(groups)
    layout = packed.table.layout()
    _check(layout, *_qkv(9, layout.batch, 4, 2, layout.seq_len, 8), 0.3)
    assert segment_windows(layout) is segment_windows(layout)  # one table for every layer


def test_windows_of_an_all_padding_layout_give_zeros():
    empty = torch.zeros(2, 3, dtype=torch.long)
    layout = TreeLayout(empty, empty, empty - 1, 6)
    q, k, v = _qkv(1, 2, 2, 1, 6, 4)
    out = tree_attention_windows(q, k, v, layout, 0.5)
    assert bool((out == 0).all())
