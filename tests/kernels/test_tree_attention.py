"""tree_attention: forward (output, log-sum-exp) and backward (dQ, dK, dV) against a float64 dense
reference written here from the segment table by plain loops; block enumeration; input checks."""

from __future__ import annotations

import random

import pytest
import torch

from cepo_kernels.reference.tree_attention import TreeLayout, tree_attention_forward, tree_attention_sdpa
from cepo_kernels.tree_attention import tree_attention, tree_layout
from tests.kernels.helpers import DTYPE_IDS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |err| / max |ref| for the output and each gradient (inputs rounded to the dtype first, so
# this measures the kernel's own rounding: p in the dtype before the P @ V / dS @ K products).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-12}


def random_table(seed: int, batch: int, T: int, max_segments: int = 9, max_len: int = 9):
    """A random forest per row: depth <= 3, lengths in {0, 1, odd, even}, segments laid out in a
    random order with random gaps (padding) between them."""
    rng = random.Random(seed)
    starts, lens, parents = [], [], []
    for _ in range(batch):
        n = rng.randint(1, max_segments)
        depth, parent, length = [], [], []
        for s in range(n):
            p = -1 if s == 0 or rng.random() < 0.15 else rng.randrange(s)
            while p >= 0 and depth[p] >= 3:
                p = parent[p]
            parent.append(p)
            depth.append(0 if p < 0 else depth[p] + 1)
            length.append(rng.choice([0, 1, rng.randint(2, max_len), rng.randint(2, max_len)]))
        while sum(length) > T:
            length[rng.randrange(n)] //= 2
        order = list(range(n))
        rng.shuffle(order)
        start = [0] * n
        col, free = 0, T - sum(length)
        for s in order:
            gap = rng.randint(0, min(free, 3))
            col += gap
            free -= gap
            start[s] = col
            col += length[s]
        starts.append(start)
        lens.append(length)
        parents.append(parent)
    width = max(len(s) for s in starts)

    def pad(rows, fill):
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)

    return pad(starts, 0), pad(lens, 0), pad(parents, -1)


def long_table():
    """Two rows of 64 with segments long enough that whole 16 x 16 blocks are visible."""
    seg_start = torch.tensor([[0, 21, 38, 64], [0, 34, 51, 62]])
    seg_len = torch.tensor([[21, 17, 26, 0], [34, 17, 11, 0]])
    seg_parent = torch.tensor([[-1, 0, 1, 2], [-1, 0, 0, -1]])
    seg_start[0, 3] = 0  # an empty segment
    return seg_start, seg_len, seg_parent


def dense_mask64(seg_start, seg_len, seg_parent, T) -> torch.Tensor:
    """(B, T, T) bool by loops: query i sees key j iff j's segment is a proper ancestor of i's, or
    both share a segment and j <= i."""
    batch, n_seg = seg_start.shape
    mask = torch.zeros(batch, T, T, dtype=torch.bool)
    for b in range(batch):
        owner = [-1] * T
        for s in range(n_seg):
            for t in range(int(seg_start[b, s]), int(seg_start[b, s] + seg_len[b, s])):
                owner[t] = s
        for i in range(T):
            a = owner[i]
            if a < 0:
                continue
            ancestors, p = set(), int(seg_parent[b, a])
            while p >= 0:
                ancestors.add(p)
                p = int(seg_parent[b, p])
            for j in range(T):
                c = owner[j]
                mask[b, i, j] = c >= 0 and (c in ancestors or (c == a and j <= i))
    return mask


def reference64(q, k, v, mask, scale):
    """float64 ``(out, lse)`` by explicit softmax; differentiable."""
    heads = q.shape[1]
    group = heads // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return p @ vv, lse


def make_qkv(seed, batch, heads, kv_heads, T, D, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, h, T, D, generator=g).to(dtype).to(device).requires_grad_(True)
        for h in (heads, kv_heads, kv_heads)
    ]


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ"
    if not bool(finite.any()):
        return 0.0
    scale = want[finite].abs().max().clamp(min=1e-30)
    return float((got.double()[finite] - want[finite]).abs().max() / scale)


def device_for(backend):
    return "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"


CASES = [
    # (seed, batch, heads, kv_heads, T, D, longest segment)
    pytest.param(1, 2, 4, 2, 37, 16, 9, id="gqa2-T37"),
    pytest.param(2, 1, 2, 2, 64, 16, 9, id="mha-T64"),
    pytest.param(3, 2, 3, 1, 23, 12, 9, id="mqa-T23-D12"),
    pytest.param(5, 2, 2, 1, 64, 16, 40, id="long-segments-T64"),  # blocks wholly visible: mask skipped
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("seed,batch,heads,kv_heads,T,D,max_len", CASES)
def test_tree_attention_forward_backward_matches_reference(backend, dtype, seed, batch, heads, kv_heads, T, D, max_len):
    device = device_for(backend)
    seg = long_table() if max_len > 9 else random_table(seed, batch, T, max_len=max_len)
    mask = dense_mask64(*seg, T).to(device)
    q, k, v = make_qkv(seed, batch, heads, kv_heads, T, D, dtype, device)
    scale = D**-0.5
    out, lse = tree_attention(q, k, v, tuple(t.to(device) for t in seg), backend=backend)
    want_out, want_lse = reference64(q, k, v, mask, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:-1]
    assert rel_err(out, want_out) < TOL[dtype]
    assert rel_err(lse, want_lse) < 1e-5
    # padding queries: zero output, -inf lse
    pad = ~mask.any(-1)
    assert bool((out.double()[pad[:, None].expand_as(lse)] == 0).all())
    assert bool(torch.isneginf(lse[pad[:, None].expand_as(lse)]).all())

    g = torch.Generator().manual_seed(seed + 100)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(device)

    def loss(o, lse_):
        finite = torch.isfinite(lse_)
        return (o.double() * grad_out).sum() + (torch.where(finite, lse_.double(), 0.0) * grad_lse).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(want_out, want_lse), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype, name
        assert rel_err(a, b) < TOL[dtype] * 2, f"d{name}: {rel_err(a, b)}"


def test_tree_attention_torch_backend_float64_is_exact():
    seg = random_table(7, 2, 30)
    q, k, v = make_qkv(7, 2, 4, 2, 30, 8, torch.float64, "cpu")
    out, lse = tree_attention(q, k, v, seg, backend="torch")
    want_out, want_lse = reference64(q, k, v, dense_mask64(*seg, 30), 8**-0.5)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_err(out, want_out) < 1e-13 and rel_err(lse, want_lse) < 1e-13
    gq, gk, gv = torch.autograd.grad(out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), (q, k, v))
    wq, wk, wv = torch.autograd.grad(
        want_out.sum() + torch.where(torch.isfinite(want_lse), want_lse, 0).sum(), (q, k, v)
    )
    for a, b in ((gq, wq), (gk, wk), (gv, wv)):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("seed,heads,kv_heads", [(21, 4, 2), (22, 3, 1), (23, 2, 2)], ids=["gqa2", "mqa", "mha"])
def test_tree_attention_without_lse_matches_reference(backend, dtype, seed, heads, kv_heads):
    """need_lse=False (SDPA on the torch backend): output and dQ/dK/dV against float64, with empty
    and one-token segments, gaps, trailing padding and a row that is all padding; no NaN anywhere."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels take fp16/bf16/fp32")
    device = device_for(backend)
    T, D = 29, 16
    s0, l0, p0 = random_table(seed, 2, T)
    width = s0.shape[1]
    zeros = torch.zeros(1, width, dtype=torch.long)
    seg = (torch.cat([s0, zeros]), torch.cat([l0, zeros]), torch.cat([p0, zeros - 1]))  # row 2: all padding
    seg = tuple(t.clone() for t in seg)
    seg[1][0, 0] = 1  # a one-token root
    mask = dense_mask64(*seg, T).to(device)
    assert bool((~mask.any(-1)).any()) and bool(mask.any(-1).any())
    layout = TreeLayout(*(t.to(device) for t in seg), T)
    q, k, v = make_qkv(seed, 3, heads, kv_heads, T, D, dtype, device)
    out, lse = tree_attention(q, k, v, layout, backend=backend, need_lse=False)
    assert lse is None and out.dtype == dtype and out.shape == q.shape
    want_out, _ = reference64(q, k, v, mask, D**-0.5)
    tol = TOL[dtype]
    assert rel_err(out, want_out) < tol
    pad = ~mask.any(-1)[:, None].expand(out.shape[:-1])
    assert bool((out[pad] == 0).all())
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    got = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and bool(torch.isfinite(a).all()), name
        assert rel_err(a, b) < tol * 2, f"d{name}: {rel_err(a, b)}"
    if backend == "torch":
        assert layout.sdpa_mask()[0] is layout.sdpa_mask()[0]  # built once, shared by every layer


def test_tree_attention_sdpa_path_matches_explicit():
    seg = random_table(11, 2, 40)
    layout = TreeLayout(*seg, 40)
    q, k, v = (t.detach() for t in make_qkv(11, 2, 4, 2, 40, 16, torch.float64, "cpu"))
    got = tree_attention_sdpa(q, k, v, layout, 0.3)
    want, _ = tree_attention_forward(q, k, v, layout, 0.3)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("blocks", [(16, 16), (8, 32), (4, 4), (64, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_tree_layout_block_lists_are_exactly_the_needed_blocks(seed, blocks):
    T = 61
    seg = random_table(seed, 3, T, max_segments=12)
    layout = TreeLayout(*seg, T)
    bm, bn = blocks
    mask = dense_mask64(*seg, T)
    assert torch.equal(layout.dense_mask(), mask)
    nq, nk = -(-T // bm), -(-T // bn)
    padded = torch.zeros(3, nq * bm, nk * bn, dtype=torch.bool)
    padded[:, :T, :T] = mask
    need = padded.view(3, nq, bm, nk, bn).any(4).any(2)
    # a block is "full" when all its pairs are visible (queries and keys all real tokens)
    real_q = torch.zeros(3, nq * bm, dtype=torch.bool)
    real_q[:, :T] = layout.seg >= 0
    real_k = torch.zeros(3, nk * bn, dtype=torch.bool)
    real_k[:, :T] = layout.seg >= 0
    all_vis = (padded | ~real_q[:, :, None] | ~real_k[:, None, :]).view(3, nq, bm, nk, bn).all(4).all(2)
    all_real = real_q.view(3, nq, bm).all(-1)[:, :, None] & real_k.view(3, nk, bn).all(-1)[:, None, :]
    q2k_idx, q2k_cnt, q2k_full, k2q_idx, k2q_cnt, k2q_full = layout.block_lists(bm, bn)
    listed = torch.zeros_like(need)
    listed_t = torch.zeros_like(need)
    full = torch.zeros_like(need)
    full_t = torch.zeros_like(need)
    for b in range(3):
        for i in range(nq):
            cols = q2k_idx[b, i, : q2k_cnt[b, i]].long()
            listed[b, i, cols] = True
            full[b, i, cols] = q2k_full[b, i, : q2k_cnt[b, i]].bool()
            assert torch.equal(cols, cols.sort().values)
        for j in range(nk):
            rows = k2q_idx[b, j, : k2q_cnt[b, j]].long()
            listed_t[b, rows, j] = True
            full_t[b, rows, j] = k2q_full[b, j, : k2q_cnt[b, j]].bool()
    assert torch.equal(listed, need)
    assert torch.equal(listed_t, need)
    assert torch.equal(full, full_t)
    # "full" is never claimed wrongly; it may be missed only where a block spans two segments
    assert not bool((full & ~(all_vis & all_real & need)).any())
    assert torch.equal(full, layout.full_blocks(bm, bn) & need)


def test_tree_attention_permuting_segments_in_the_row_changes_nothing():
    """The same tree laid out in another order gives the same per-token results."""
    T = 30
    seg_start = torch.tensor([[0, 6, 9, 13, 20, 25]])
    seg_len = torch.tensor([[6, 3, 4, 7, 5, 0]])
    seg_parent = torch.tensor([[-1, 0, 0, 1, 2, 1]])
    q, k, v = (t.detach() for t in make_qkv(3, 1, 2, 1, T, 8, torch.float64, "cpu"))
    out, lse = tree_attention(q, k, v, (seg_start, seg_len, seg_parent))
    # new order of the same segments: 4, 2, 0, 3, 1 (+ empty 5), with a gap of 2 at the front
    new_start = torch.tensor([[11, 24, 7, 17, 2, 0]])
    perm = torch.full((T,), -1, dtype=torch.long)  # perm[new index] = old index
    for s in range(6):
        for t in range(int(seg_len[0, s])):
            perm[new_start[0, s] + t] = seg_start[0, s] + t
    used = perm >= 0
    src = torch.where(used, perm, 29)
    q2, k2, v2 = (x[:, :, src] for x in (q, k, v))
    out2, lse2 = tree_attention(q2, k2, v2, (new_start, seg_len, seg_parent))
    assert torch.allclose(out2[:, :, used], out[:, :, perm[used]], atol=1e-13, rtol=0)
    assert torch.allclose(lse2[:, :, used], lse[:, :, perm[used]], atol=1e-13, rtol=0)
    assert bool(torch.isneginf(lse2[:, :, ~used]).all())


@pytest.mark.parametrize(
    "seg_start,seg_len,seg_parent,match",
    [
        ([[0, 3]], [[4, 2]], [[-1, 0]], "overlap"),
        ([[0, 4]], [[4, 2]], [[1, 0]], "chain of parents"),
        ([[0, 1, 2, 3, 4]], [[1, 1, 1, 1, 1]], [[-1, 0, 1, 2, 3]], "MAX_DEPTH"),
        ([[0, 4]], [[4, 2]], [[-1, 5]], "seg_parent"),
        ([[0, 4]], [[4, 9]], [[-1, 0]], "past the row"),
        ([[0, 4]], [[4, 2]], [[-1, 1]], "own parent"),
    ],
    ids=["overlap", "cycle", "too-deep", "bad-parent", "too-long", "self-parent"],
)
def test_tree_attention_rejects_bad_segment_tables(seg_start, seg_len, seg_parent, match):
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match=match):
        tree_attention(
            q, q[:, :1], q[:, :1], (torch.tensor(seg_start), torch.tensor(seg_len), torch.tensor(seg_parent))
        )


def test_tree_attention_rejects_bad_shapes():
    seg = (torch.tensor([[0]]), torch.tensor([[10]]), torch.tensor([[-1]]))
    q = torch.randn(1, 3, 10, 8)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention(q, q[:, :2], q[:, :2], seg)
    with pytest.raises(ValueError, match="one dtype"):
        tree_attention(q, q[:, :1].double(), q[:, :1].double(), seg)
    with pytest.raises(ValueError, match="layout is for"):
        tree_attention(q, q[:, :1], q[:, :1], tree_layout(*seg, 12))
    with pytest.raises(ValueError, match="backend"):
        tree_attention(q, q[:, :1], q[:, :1], seg, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
def test_tree_attention_triton_matches_reference_at_model_shapes(dtype):
    """Qwen3-1.7B heads (16 / 8, head dim 128), two groups of prompt | r+ | r- | 3 x 4 responses per row."""
    lens, parents = [], []
    for _ in range(2):
        base = len(lens)
        lens += [333, 16, 0] + [97, 200, 1, 64] * 3
        parents += [-1, base, base] + [base] * 4 + [base + 1] * 4 + [base + 2] * 4
    starts = [sum(lens[:i]) for i in range(len(lens))]
    T = sum(lens) + 5  # padding at the end
    seg = (torch.tensor([starts]), torch.tensor([lens]), torch.tensor([parents]))
    q, k, v = make_qkv(0, 1, 16, 8, T, 128, dtype, "cuda")
    out, lse = tree_attention(q, k, v, tuple(t.cuda() for t in seg), backend="triton")
    layout = TreeLayout(*(t.cuda() for t in seg), T)
    want_out, want_lse = tree_attention_forward(q.double(), k.double(), v.double(), layout, 128**-0.5)
    assert rel_err(out, want_out) < TOL[dtype]
    assert rel_err(lse, want_lse) < 1e-5
    g = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    got = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < TOL[dtype] * 2, name


@pytest.mark.parametrize("need_lse", [True, False], ids=["lse", "no-lse"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n_seg", [0, 2], ids=["no-segments", "empty-segments"])
def test_tree_attention_all_padding_gives_zero_output_and_zero_grads(backend, n_seg, need_lse):
    device = device_for(backend)
    q, k, v = make_qkv(0, 1, 2, 1, 9, 16, torch.float32, device)
    empty = torch.zeros(1, n_seg, dtype=torch.long, device=device)
    out, lse = tree_attention(q, k, v, (empty, empty, empty - 1), backend=backend, need_lse=need_lse)
    assert bool((out == 0).all()) and (lse is None if not need_lse else bool(torch.isneginf(lse).all()))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(bool((g == 0).all()) for g in grads)
