"""``tree_attention``: attention over a packed row of segments that form a tree (shared prefixes).

A group's prompt is packed once, followed by segments that continue it (answers, responses);
each query sees its ancestor segments whole and its own segment causally. See
``cepo_kernels/reference/tree_attention.py`` for the exact rule and ``docs/tree_attention.md``.

Backends: ``triton`` (GPU; CPU under ``TRITON_INTERPRET=1``) and ``torch`` (reference: dense
mask, explicit softmax; the CPU path, fp64 capable). The backward of the torch backend is the
explicit formula (``reference.tree_attention.tree_attention_backward``), traceable by
``torch.compile``. With ``need_lse=False`` the torch backend runs SDPA over each segment's window
(its ancestor chain and itself, ``reference/tree_attention_windows.py``; index tables cached on
the :class:`TreeLayout`, so they are built once per forward).
"""

from __future__ import annotations

import torch

from cepo_kernels import _dispatch, _validate
from cepo_kernels.reference import tree_attention as ref
from cepo_kernels.reference.tree_attention import MAX_DEPTH, TreeLayout
from cepo_kernels.reference.tree_attention_windows import tree_attention_windows

OP = "tree_attention"
ORDER = ("triton", "torch")
DTYPES = {"torch": _validate.FLOAT_DTYPES}

__all__ = ["MAX_DEPTH", "OP", "ORDER", "TreeLayout", "tree_attention", "tree_layout"]


def tree_layout(seg_start: torch.Tensor, seg_len: torch.Tensor, seg_parent: torch.Tensor, seq_len: int) -> TreeLayout:
    """Validate a segment table and build its token-level :class:`TreeLayout` (reuse it across layers).

    Args:
        seg_start: ``(B, S)`` int, first packed index of each segment.
        seg_len: ``(B, S)`` int, its length (0 allowed: an empty segment).
        seg_parent: ``(B, S)`` int, parent segment index or ``-1`` for a root; chains of at most
            ``MAX_DEPTH`` segments.
        seq_len: ``T``, the packed row length; tokens in no segment are padding.

    Raises:
        ValueError: overlapping segments, a segment past ``T``, a bad parent, a cycle or a chain
            deeper than ``MAX_DEPTH``.
    """
    return TreeLayout(seg_start, seg_len, seg_parent, seq_len)


class TreeAttentionFunction(torch.autograd.Function):
    """Autograd over (q, k, v); the backend chosen for the forward also runs the backward."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, backend):
        if backend == "triton":
            from cepo_kernels.triton import tree_attention as tri

            out, lse = tri.tree_attention_fwd(q, k, v, layout, scale)
        else:
            with torch.no_grad():
                out, lse = ref.tree_attention_forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (layout, scale, backend)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, scale, backend = ctx.cfg
        if backend == "triton":
            from cepo_kernels.triton import tree_attention as tri

            dq, dk, dv = tri.tree_attention_bwd(q, k, v, out, lse, grad_out, grad_lse, layout, scale)
        else:
            dq, dk, dv = ref.tree_attention_backward(q, k, v, lse, grad_out, grad_lse, layout, scale)
        return dq, dk, dv, None, None, None


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: TreeLayout | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    scale: float | None = None,
    backend: str = "auto",
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention in which each query sees its ancestor segments and, causally, its own segment.

    Args:
        q: ``(B, H, T, D)`` float16/bfloat16/float32 (float64 on the torch backend).
        k, v: ``(B, H_kv, T, D)``, same dtype and device; ``H`` a multiple of ``H_kv`` (GQA).
        segments: a :class:`TreeLayout` (from :func:`tree_layout`, reused across layers) or the
            segment table ``(seg_start, seg_len, seg_parent)``, each ``(B, S)`` int.
        scale: the score scale, default ``D ** -0.5``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        need_lse: ``False`` returns ``(out, None)``; the torch backend then runs
            ``F.scaled_dot_product_attention`` over each segment's window of keys (autograd through
            SDPA; many times faster than the explicit softmax on a CPU, and linear in the segment
            lengths rather than quadratic in the row), the triton backend is unchanged. This is
            what a model's attention layers want.

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, T, D)`` in q's dtype, ``o_i = sum_j softmax_j(s_ij) v_j``
        with ``s_ij = scale q_i.k_j`` over the keys ``j`` that query ``i`` sees; ``lse`` ``(B, H, T)``
        float32 (float64 on the torch backend for float64 inputs), ``log sum_j exp(s_ij)``, or
        ``None`` when ``need_lse=False``. Queries that see no key (padding) give ``out = 0`` (zero
        gradient, never NaN) and ``lse = -inf``. Differentiable in q, k, v through both outputs.
    """
    _validate.check_float("q", q, min_dim=4)
    _validate.check_float("k", k, min_dim=4)
    _validate.check_float("v", v, min_dim=4)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D (B, H, T, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    batch, heads, T, D = q.shape
    if k.shape[0] != batch or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k: expected shape ({batch}, H_kv, {T}, {D}) to match q, got {tuple(k.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"k: H={heads} query heads must be a multiple of H_kv={k.shape[1]} key heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _validate.check_same_device(q=q, k=k, v=v)
    if isinstance(segments, TreeLayout):
        layout = segments
    elif isinstance(segments, (tuple, list)) and len(segments) == 3:
        layout = TreeLayout(*segments, T)
    else:
        raise ValueError("segments: expected a TreeLayout or a (seg_start, seg_len, seg_parent) tuple")
    if layout.batch != batch or layout.seq_len != T:
        raise ValueError(f"segments: layout is for (B={layout.batch}, T={layout.seq_len}), q has (B={batch}, T={T})")
    if layout.device != q.device:
        raise ValueError(f"segments: layout on {layout.device}, q on {q.device}")
    if scale is None:
        scale = D**-0.5
    scale = float(scale)
    # head dims above 128 exceed the triton tiles' registers: auto takes torch, triton says why
    order = ORDER if D <= 128 or backend != "auto" else ("torch",)
    chosen = _dispatch.resolve(OP, backend, order, [q, k, v], dtypes=DTYPES)
    if chosen == "torch" and need_lse:
        layout.sdpa_mask()  # build (and cache) the mask here, outside the autograd Function
    if not need_lse:
        if chosen == "torch":
            if _validate._compiling():
                # the window tables are sized from the segment table (data-dependent shapes):
                # under torch.compile the dense-mask SDPA (same result) keeps the graph whole
                return ref.tree_attention_sdpa(q, k, v, layout, scale), None
            # one SDPA over each segment's window (its ancestors and itself): linear in the segments,
            # not quadratic in the row (reference/tree_attention_windows.py)
            return tree_attention_windows(q, k, v, layout, scale), None
        return TreeAttentionFunction.apply(q, k, v, layout, scale, chosen)[0], None
    return TreeAttentionFunction.apply(q, k, v, layout, scale, chosen)
