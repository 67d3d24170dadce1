"""Reference (plain PyTorch) tree attention: the segment-table layout, the dense mask it implies,
and attention under that mask (explicit softmax with log-sum-exp, and an SDPA path).

A packed row of ``T`` tokens is cut into ``S`` segments. Segment ``s`` covers the tokens
``[start_s, start_s + len_s)`` and has a parent segment ``parent_s`` (``-1`` for a root). Tokens
outside every segment are padding. A query token ``i`` of segment ``a`` sees key token ``j`` of
segment ``c`` iff

    c is a proper ancestor of a                       (the whole ancestor segment), or
    c == a and j <= i                                  (causal inside its own segment).

Padding queries see nothing: their output is 0 and their log-sum-exp ``-inf``.

Visibility is decided per token from three small tables (the :class:`TreeLayout`): the token's
segment ``seg[j]``, that segment's depth ``depth[j]`` (0 for a root) and, for every depth
``d < MAX_DEPTH``, the token's ancestor segment at that depth ``anc[d, i]`` (its own segment at
``d == depth[i]``, ``-1`` below it). Then ``i`` sees ``j`` iff ``anc[depth[j], i] == seg[j] >= 0``
and ``(seg[j] != seg[i] or j <= i)``. The Triton kernel evaluates the same test inside the key
blocks it visits; :meth:`TreeLayout.block_lists` enumerates those blocks from the segment table.

Attention, with ``scale`` (default ``D ** -0.5``), per batch row ``b`` and query head ``h`` (key
head ``h // (H / H_kv)``, grouped-query attention)::

    s_ij = scale * q_i . k_j   for visible (i, j), else -inf
    lse_i = log sum_j exp(s_ij)
    o_i = sum_j exp(s_ij - lse_i) v_j

The math runs in fp32 (fp64 for fp64 inputs), ``chunk`` query rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_DEPTH = 4  # prompt -> answer -> response is depth 2; the kernel tests this many ancestor levels
CHUNK_ELEMENTS = 1 << 24  # score elements per chunk of query rows in the explicit path
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2] if x.isdigit()) >= (2, 5)  # has enable_gqa


class TreeLayout:
    """Token-level view of a segment table, built once and shared by every layer of a forward.

    Attributes (all on the segment table's device):
        seg_start, seg_len, seg_parent: ``(B, S)`` int64, the table as given.
        seq_len: ``T``, the packed row length.
        seg: ``(B, T)`` int32, segment of each token, ``-1`` for padding.
        depth: ``(B, T)`` int32, depth of the token's segment (0 for roots and padding).
        anc: ``(B, MAX_DEPTH, T)`` int32, ancestor segment of each token at each depth, ``-1`` below
            the token's own depth and for padding.
        seg_depth: ``(B, S)`` int64, depth of each segment.
        seg_anc: ``(B, S, MAX_DEPTH)`` int64, ancestor of each segment at each depth (itself at its
            own depth, ``-1`` below).
    """

    def __init__(self, seg_start: torch.Tensor, seg_len: torch.Tensor, seg_parent: torch.Tensor, seq_len: int):
        for name, t in (("seg_start", seg_start), ("seg_len", seg_len), ("seg_parent", seg_parent)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dim() != 2:
                raise ValueError(f"{name}: expected a (B, S) integer tensor, got {getattr(t, 'shape', type(t))}")
        if not (seg_start.shape == seg_len.shape == seg_parent.shape):
            raise ValueError(
                "seg_start, seg_len, seg_parent: expected one shape (B, S), got "
                f"{tuple(seg_start.shape)}, {tuple(seg_len.shape)}, {tuple(seg_parent.shape)}"
            )
        if seq_len < 0:
            raise ValueError(f"seq_len: expected >= 0, got {seq_len}")
        dev = seg_start.device
        if seg_start.shape[1] == 0:  # no segments at all: one empty segment keeps the gathers below valid
            seg_start = seg_len = torch.zeros(seg_start.shape[0], 1, dtype=torch.long, device=dev)
            seg_parent = torch.full_like(seg_start, -1)
        self.seg_start = seg_start.long()
        self.seg_len = seg_len.long()
        self.seg_parent = seg_parent.long()
        self.seq_len = int(seq_len)
        batch, n_seg = self.seg_start.shape
        self.batch, self.n_seg = batch, n_seg
        start, length, parent = self.seg_start, self.seg_len, self.seg_parent
        if bool((length < 0).any()) or bool((start < 0).any()):
            raise ValueError("seg_start, seg_len: expected non-negative starts and lengths")
        if bool(((start + length) > seq_len).any()):
            raise ValueError(f"seg_start + seg_len: a segment runs past the row length {seq_len}")
        if bool(((parent < -1) | (parent >= n_seg)).any()):
            raise ValueError(f"seg_parent: expected -1 or a segment index in [0, {n_seg})")
        if bool((parent == torch.arange(n_seg, device=dev)).any()):
            raise ValueError("seg_parent: a segment cannot be its own parent")

        # Ancestor chains: chain[..., i] is the i-th ancestor (0 = itself), -1 past the root.
        chains = torch.full((batch, n_seg, MAX_DEPTH), -1, dtype=torch.long, device=dev)
        cur = torch.arange(n_seg, device=dev).expand(batch, n_seg).clone()
        for i in range(MAX_DEPTH):
            chains[..., i] = cur
            nxt = torch.gather(parent, 1, cur.clamp(min=0))
            cur = torch.where(cur >= 0, nxt, cur)
        if bool((cur >= 0).any()):
            raise ValueError(
                f"seg_parent: a chain of parents holds more than MAX_DEPTH={MAX_DEPTH} segments (or has a cycle)"
            )
        self.seg_depth = (chains >= 0).sum(-1) - 1  # (B, S)
        d = torch.arange(MAX_DEPTH, device=dev)
        idx = (self.seg_depth[..., None] - d).clamp(min=0)  # position in the chain of depth d
        self.seg_anc = torch.where(
            d <= self.seg_depth[..., None], torch.gather(chains, 2, idx), torch.full_like(idx, -1)
        )  # (B, S, MAX_DEPTH)

        # Token ownership; segments must not overlap.
        flat_len = length.reshape(-1)
        owner = torch.repeat_interleave(torch.arange(batch * n_seg, device=dev), flat_len)
        first = torch.cumsum(flat_len, 0) - flat_len
        within = torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(first, flat_len)
        row = owner // max(n_seg, 1)
        flat_pos = row * seq_len + start.reshape(-1)[owner] + within
        count = torch.zeros(batch * seq_len, dtype=torch.long, device=dev)
        count.index_add_(0, flat_pos, torch.ones_like(flat_pos))
        if count.numel() and int(count.max()) > 1:
            raise ValueError("seg_start, seg_len: segments overlap; every token belongs to at most one segment")
        seg = torch.full((batch * seq_len,), -1, dtype=torch.long, device=dev)
        seg[flat_pos] = owner % max(n_seg, 1)
        seg = seg.view(batch, seq_len)
        safe = seg.clamp(min=0)
        pad = seg < 0
        depth = torch.gather(self.seg_depth, 1, safe).masked_fill(pad, 0)
        anc = torch.gather(self.seg_anc, 1, safe[..., None].expand(batch, seq_len, MAX_DEPTH))
        anc = anc.masked_fill(pad[..., None], -1).permute(0, 2, 1)
        self.seg = seg.to(torch.int32).contiguous()
        self.depth = depth.to(torch.int32).contiguous()
        self.anc = anc.to(torch.int32).contiguous()
        self._blocks: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._sdpa_mask: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.seg.device

    def to(self, device: torch.device | str) -> TreeLayout:
        if torch.device(device) == self.device:
            return self
        return TreeLayout(self.seg_start.to(device), self.seg_len.to(device), self.seg_parent.to(device), self.seq_len)

    def dense_mask(self, q_rows: slice | None = None) -> torch.Tensor:
        """``(B, Tq, T)`` bool: ``True`` where query ``i`` (rows ``q_rows``) sees key ``j``."""
        rows = q_rows or slice(0, self.seq_len)
        seg_k, depth_k = self.seg.long(), self.depth.long()
        seg_q = seg_k[:, rows]
        anc_q = self.anc[:, :, rows].long()
        vis = torch.zeros(self.batch, seg_q.shape[1], self.seq_len, dtype=torch.bool, device=self.device)
        for d in range(MAX_DEPTH):
            vis |= (depth_k[:, None, :] == d) & (anc_q[:, d, :, None] == seg_k[:, None, :])
        vis &= seg_k[:, None, :] >= 0
        qi = torch.arange(self.seq_len, device=self.device)[rows]
        kj = torch.arange(self.seq_len, device=self.device)
        vis &= (seg_k[:, None, :] != seg_q[:, :, None]) | (kj[None, None, :] <= qi[None, :, None])
        return vis

    def sdpa_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, seen)``: ``mask`` ``(B, 1, T, T)`` bool, :meth:`dense_mask` with each padding query
        also seeing itself (so no softmax row is empty and SDPA gives no NaN, forward or backward);
        ``seen`` ``(B, 1, T, 1)`` bool, True for queries that see some key in :meth:`dense_mask`.
        Built once per layout and cached (every layer of a forward reuses it; ``B * T * T`` bytes)."""
        if self._sdpa_mask is None:
            mask = self.dense_mask()
            seen = mask.any(-1)  # (B, T)
            idx = torch.arange(self.seq_len, device=self.device)
            mask[:, idx, idx] |= ~seen
            self._sdpa_mask = (mask[:, None], seen[:, None, :, None])
        return self._sdpa_mask

    def block_lists(self, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which key blocks each query block must visit, and the transpose, from the segment table.

        Returns ``(q2k_idx, q2k_cnt, q2k_full, k2q_idx, k2q_cnt, k2q_full)``, int32: query block
        ``i`` of row ``b`` visits the key blocks ``q2k_idx[b, i, :q2k_cnt[b, i]]`` (ascending); key
        block ``j`` is visited by the query blocks ``k2q_idx[b, j, :k2q_cnt[b, j]]``. A block pair
        is listed iff some query of the one may see some key of the other: per (segment, query
        block) the visible keys are the ancestor segments' ranges and the own segment up to the
        block's last query. ``*_full`` (aligned with the lists) is 1 where every query of the block
        sees every key of the other, so the kernel may skip the token mask. Cached.
        """
        key = (block_m, block_n)
        if key in self._blocks:
            return self._blocks[key]
        dev, batch, n_seg, T = self.device, self.batch, self.n_seg, self.seq_len
        nq, nk = triton_cdiv(T, block_m), triton_cdiv(T, block_n)
        start, length = self.seg_start, self.seg_len
        end = start + length
        nonempty = length > 0
        i0 = start // block_m
        n_pairs = torch.where(nonempty, (end - 1) // block_m - i0 + 1, torch.zeros_like(start))
        flat = n_pairs.reshape(-1)
        owner = torch.repeat_interleave(torch.arange(batch * n_seg, device=dev), flat)
        first = torch.cumsum(flat, 0) - flat
        within = torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(first, flat)
        b = owner // max(n_seg, 1)
        qb = i0.reshape(-1)[owner] + within
        q_end = torch.minimum(end.reshape(-1)[owner], (qb + 1) * block_m)  # one past the block's last query
        diff = torch.zeros(batch, nq, nk + 1, dtype=torch.int32, device=dev)

        def add(sel: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
            one = torch.ones(int(sel.sum()), dtype=torch.int32, device=dev)
            diff.index_put_((b[sel], qb[sel], lo[sel]), one, accumulate=True)
            diff.index_put_((b[sel], qb[sel], hi[sel] + 1), -one, accumulate=True)

        own_lo = start.reshape(-1)[owner] // block_n
        add(torch.ones_like(owner, dtype=torch.bool), own_lo, (q_end - 1) // block_n)
        depth = self.seg_depth.reshape(-1)[owner]
        anc_all = self.seg_anc.reshape(batch * n_seg, MAX_DEPTH)[owner]  # (P, MAX_DEPTH) segment ids
        for d in range(MAX_DEPTH):
            a = anc_all[:, d]
            flat_a = b * n_seg + a.clamp(min=0)
            a_len = length.reshape(-1)[flat_a]
            sel = (d < depth) & (a >= 0) & (a_len > 0)
            a_start = start.reshape(-1)[flat_a]
            add(sel, a_start // block_n, (a_start + a_len - 1).clamp(min=0) // block_n)
        vis = torch.cumsum(diff, -1)[..., :nk] > 0  # (B, nq, nk)
        full = self.full_blocks(block_m, block_n)
        q2k_idx, q2k_cnt = _lists(vis)
        k2q_idx, k2q_cnt = _lists(vis.transpose(1, 2))
        q2k_full = full.gather(2, q2k_idx.long()).to(torch.int32).contiguous()
        k2q_full = full.transpose(1, 2).gather(2, k2q_idx.long()).to(torch.int32).contiguous()
        self._blocks[key] = (q2k_idx, q2k_cnt, q2k_full, k2q_idx, k2q_cnt, k2q_full)
        return self._blocks[key]

    def full_blocks(self, block_m: int, block_n: int) -> torch.Tensor:
        """``(B, nq, nk)`` bool: query block ``i`` lies in one segment ``a``, key block ``j`` in one
        segment ``c``, and ``c`` is a proper ancestor of ``a``, or ``c == a`` and the key block ends
        before the query block starts (every pair visible)."""
        dev, T = self.device, self.seq_len
        nq, nk = triton_cdiv(T, block_m), triton_cdiv(T, block_n)
        if self.n_seg == 0:
            return torch.zeros(self.batch, nq, nk, dtype=torch.bool, device=dev)

        def single(bs: int, n: int) -> torch.Tensor:
            seg = torch.full((self.batch, n * bs), -1, dtype=torch.long, device=dev)
            seg[:, :T] = self.seg
            blocks = seg.view(self.batch, n, bs)
            lo, hi = blocks.amin(-1), blocks.amax(-1)
            return torch.where((lo == hi) & (lo >= 0), lo, torch.full_like(lo, -1))

        sq, sk = single(block_m, nq), single(block_n, nk)  # (B, nq), (B, nk)
        depth_q = torch.gather(self.seg_depth, 1, sq.clamp(min=0))  # (B, nq)
        depth_k = torch.gather(self.seg_depth, 1, sk.clamp(min=0))  # (B, nk)
        anc_q = torch.gather(self.seg_anc, 1, sq.clamp(min=0)[..., None].expand(-1, -1, MAX_DEPTH))  # (B, nq, D)
        anc_at = torch.gather(
            anc_q[:, :, None, :].expand(-1, -1, nk, -1), 3, depth_k[:, None, :, None].expand(-1, nq, -1, 1)
        ).squeeze(-1)  # (B, nq, nk): ancestor of the query segment at the key segment's depth
        ancestor = (anc_at == sk[:, None, :]) & (depth_k[:, None, :] < depth_q[:, :, None])
        i = torch.arange(nq, device=dev)[:, None]
        j = torch.arange(nk, device=dev)[None, :]
        earlier = (sq[:, :, None] == sk[:, None, :]) & ((j + 1) * block_n <= i * block_m)
        return (sq[:, :, None] >= 0) & (sk[:, None, :] >= 0) & (ancestor | earlier)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _lists(vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a ``(B, R, C)`` bool matrix as ascending column lists ``(B, R, max_count)`` and counts."""
    cols = vis.shape[-1]
    cnt = vis.sum(-1)
    width = max(1, int(cnt.max()) if cnt.numel() else 1)
    ar = torch.arange(cols, device=vis.device, dtype=torch.int32)
    keyed = torch.where(vis, ar, torch.full_like(ar, cols))
    idx = keyed.sort(-1).values[..., :width]
    idx = torch.where(idx >= cols, torch.zeros_like(idx), idx)
    return idx.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, H_kv, T, D)`` -> ``(B, heads, T, D)`` by repeating each key/value head ``heads / H_kv`` times."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def tree_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TreeLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit-softmax tree attention. ``q`` (B, H, T, D), ``k``/``v`` (B, H_kv, T, D).

    Returns ``(out, lse)``: ``out`` (B, H, T, D) in ``q.dtype``; ``lse`` (B, H, T) float32 (float64
    for float64 inputs), ``-inf`` (and ``out`` 0) for queries that see no key. Differentiable by
    autograd (the torch backend's backward recomputes through this function).
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, T, _ = q.shape
    kr = repeat_kv(k, heads).to(acc)
    vr = repeat_kv(v, heads).to(acc)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * T))
    full_mask, seen = layout.sdpa_mask()  # cached on the layout: built once per forward, not per layer
    outs, lses = [], []
    for r0 in range(0, T, chunk):
        rows = slice(r0, min(T, r0 + chunk))
        mask = full_mask[:, :, rows] & seen[:, :, rows]  # (B, 1, tq, T), padding queries see nothing
        s = torch.matmul(q[:, :, rows].to(acc), kr.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        p = torch.exp(s - shift[..., None])
        outs.append(torch.matmul(p, vr))
        lses.append(lse)
    out = torch.cat(outs, 2) if outs else q.new_zeros(q.shape, dtype=acc)
    lse = torch.cat(lses, 2) if lses else q.new_zeros(q.shape[:-1], dtype=acc)
    return out.to(q.dtype), lse


def tree_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    layout: TreeLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`tree_attention_forward` for upstream gradients of ``out`` and ``lse``.

    With ``p_ij = exp(s_ij - lse_i)`` (0 where ``j`` is not visible), ``o_i = sum_j p_ij v_j``::

        dv_j  = sum_i p_ij do_i
        ds_ij = p_ij (do_i . v_j - do_i . o_i + dlse_i)      (d lse_i / d s_ij = p_ij)
        dq_i  = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i

    summed over the query heads of each key head (GQA). ``grad_lse`` is ignored where ``lse`` is
    ``-inf`` (padding). Explicit formulas rather than autograd through the forward, so
    ``torch.compile`` can trace it. fp32 math (fp64 for fp64), chunked over query rows like the
    forward; ``o`` is recomputed in that precision. Results in the inputs' dtypes.
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, T, D = q.shape
    kv_heads = k.shape[1]
    kr = repeat_kv(k, heads).to(acc)
    vr = repeat_kv(v, heads).to(acc)
    full_mask, seen = layout.sdpa_mask()
    finite = torch.isfinite(lse)
    shift_all = torch.where(finite, lse, torch.zeros_like(lse)).to(acc)
    do_all = grad_out.to(acc) if grad_out is not None else None
    dl_all = torch.where(finite, grad_lse, torch.zeros_like(grad_lse)).to(acc) if grad_lse is not None else None
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkr = torch.zeros(batch, heads, T, D, dtype=acc, device=q.device)
    dvr = torch.zeros_like(dkr)
    chunk = max(1, CHUNK_ELEMENTS // max(1, batch * heads * T))
    for r0 in range(0, T, chunk):
        rows = slice(r0, min(T, r0 + chunk))
        mask = full_mask[:, :, rows] & seen[:, :, rows]
        q_c = q[:, :, rows].to(acc)
        s = torch.matmul(q_c, kr.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.exp(s - shift_all[:, :, rows, None])  # exactly 0 where masked
        ds = torch.zeros_like(p)
        if do_all is not None:
            do_c = do_all[:, :, rows]
            o_c = torch.matmul(p, vr)
            dp = torch.matmul(do_c, vr.transpose(-1, -2))
            ds = p * (dp - (do_c * o_c).sum(-1, keepdim=True))
            dvr += torch.matmul(p.transpose(-1, -2), do_c)
        if dl_all is not None:
            ds = ds + p * dl_all[:, :, rows, None]
        dq[:, :, rows] = torch.matmul(ds, kr) * scale
        dkr += torch.matmul(ds.transpose(-1, -2), q_c) * scale
    group = heads // kv_heads
    dk = dkr.view(batch, kv_heads, group, T, D).sum(2)
    dv = dvr.view(batch, kv_heads, group, T, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def tree_attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TreeLayout, scale: float
) -> torch.Tensor:
    """Tree attention through ``F.scaled_dot_product_attention`` with the dense boolean mask (no LSE).

    Same shapes as :func:`tree_attention_forward`; differentiable by autograd through SDPA. Runs in
    the input dtype (SDPA's kernels accumulate in fp32; fp64 stays fp64). The mask is
    :meth:`TreeLayout.sdpa_mask` (cached on the layout): padding queries attend to themselves, so
    no row is empty and neither the output nor its gradients are NaN, and their output is then set
    to 0 (zero gradient flows back from them). Memory: the ``(B, T, T)`` bool mask, once per layout.
    """
    mask, seen = layout.sdpa_mask()
    heads = q.shape[1]
    if heads != k.shape[1] and _SDPA_GQA:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), attn_mask=mask, scale=scale)
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
