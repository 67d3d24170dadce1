"""Shared Triton helpers: an online log-sum-exp (and entropy accumulator) over blocks.

State per row, all fp32 scalars: ``m`` the running max (starts at -inf), ``s`` the sum of
``exp(z - m)``, ``a`` the sum of ``exp(z - m) * (z - m)``. Columns that do not exist
(past ``V``) must be loaded as ``-inf``, never 0. When every value seen so far is ``-inf``
the state stays ``(-inf, 0, 0)``.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host-side floats
LN2 = 0.6931471805599453
LOG2E_K = tl.constexpr(LOG2E)  # the same inside @triton.jit code (the compiler takes constexpr globals only)
LN2_K = tl.constexpr(LN2)


@triton.jit
def online_lse_update(m, s, z):
    """Fold a block ``z`` (fp32, -inf for missing columns) into ``(m, s)``."""
    m_new = tl.maximum(m, tl.max(z, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), 0)
    return m_new, s


@triton.jit
def online_entropy_update(m, s, a, z):
    """Fold a block ``z`` into ``(m, s, a)``; ``a`` tracks ``sum exp(z - m) * (z - m)``."""
    m_new = tl.maximum(m, tl.max(z, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    # re-centre the old terms on the new max: (z - m_new) = (z - m) + (m - m_new)
    a = tl.where(s > 0, scale * (a + s * (m - shift)), 0.0)
    e = tl.exp(z - shift)
    zs = z - shift
    a = a + tl.sum(tl.where(e > 0, e * zs, 0.0), 0)
    s = s * scale + tl.sum(e, 0)
    return m_new, s, a


@triton.jit
def finish_lse(m, s):
    """``lse = m + log(s)``; ``-inf`` for a row with no finite value."""
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift + tl.log(s)


@triton.jit
def finish_entropy(s, a):
    """Entropy ``log(s) - a / s``; 0 for a row with no finite value."""
    return tl.where(s > 0, tl.log(s) - a / s, 0.0)


# --- lane-wise variant (configuration v2): no reduction, no barrier inside the loop -------------
#
# Each of the BLOCK lanes keeps its own running max ``m`` (log2 units: the caller folds
# ``log2(e) / T`` into one multiply), sum ``s = sum 2^(z - m)`` and, for the entropy,
# ``a = sum 2^(z - m) (z - m)``. One exp2 per element: with ``d = z - m`` and ``t = 2^-|d|``,
# an element below the max adds ``t`` (and ``t d``), one above it becomes the new max and scales
# the old sum by ``t``. The lanes are combined once, at the end of the row.


@triton.jit
def lane_lse_update(m, s, z):
    """Fold ``z`` (fp32, log2 units, -inf for missing columns) into the lane state ``(m, s)``."""
    d = z - m
    d = tl.where(d != d, float("-inf"), d)  # -inf - -inf: nothing seen, nothing to add
    t = tl.exp2(-tl.abs(d))
    up = d > 0
    return tl.where(up, z, m), tl.where(up, s * t + 1.0, s + t)


@triton.jit
def lane_entropy_update(m, s, a, z):
    """As :func:`lane_lse_update`, also folding ``2^(z - m) (z - m)`` into ``a``."""
    d = z - m
    d = tl.where(d != d, float("-inf"), d)
    t = tl.exp2(-tl.abs(d))
    up = d > 0
    a = tl.where(up, tl.where(s > 0, t * (a - s * d), 0.0), a + tl.where(t > 0, t * d, 0.0))
    return tl.where(up, z, m), tl.where(up, s * t + 1.0, s + t), a


@triton.jit
def lanes_lse2(m, s):
    """Combine the lanes: ``log2 sum 2^z`` (``-inf`` for a row with no finite value)."""
    top = tl.max(m, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    return shift + tl.log2(tl.sum(s * tl.exp2(m - shift), 0))


@triton.jit
def lanes_lse2_entropy(m, s, a):
    """Combine the lanes: ``(log2 sum 2^z, entropy in nats)``; entropy 0 for an empty row."""
    top = tl.max(m, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(m - shift)
    total = tl.sum(s * w, 0)
    centred = tl.sum(tl.where(s > 0, w * (a + s * (m - shift)), 0.0), 0)
    entropy = tl.where(total > 0, (tl.log2(total) - centred / total) * 0.6931471805599453, 0.0)
    return shift + tl.log2(total), entropy


# --- one row of logits, either way -------------------------------------------------------------


@triton.jit
def load_target(ptr, LOG2: tl.constexpr):
    """The target id at ``ptr``: int32 in the log2 (v2) setting, int64 otherwise."""
    if LOG2:
        target = tl.load(ptr).to(tl.int32)
    else:
        target = tl.load(ptr).to(tl.int64)
    return target


@triton.jit
def row_lse(row_ptr, n_cols, V, scale, COMPUTE_ENTROPY: tl.constexpr, LOG2: tl.constexpr, BLOCK_V: tl.constexpr):
    """Log-sum-exp of ``row * scale`` over the first ``n_cols`` columns (``V`` columns exist),
    and its entropy in nats (0 unless ``COMPUTE_ENTROPY``). ``LOG2``: ``scale`` is
    ``log2(e) / T``, the state is lane-wise and the lse is returned in log2 units; otherwise
    ``scale`` is ``1 / T``, the state is a scalar folded each step and the lse is in nats."""
    if LOG2:
        m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_V,), tl.float32)
        a = tl.zeros((BLOCK_V,), tl.float32)
    else:
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        a = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
        if LOG2:
            if COMPUTE_ENTROPY:
                m, s, a = lane_entropy_update(m, s, a, z)
            else:
                m, s = lane_lse_update(m, s, z)
        else:
            if COMPUTE_ENTROPY:
                m, s, a = online_entropy_update(m, s, a, z)
            else:
                m, s = online_lse_update(m, s, z)
    entropy = tl.zeros((), tl.float32)
    if LOG2:
        if COMPUTE_ENTROPY:
            lse, entropy = lanes_lse2_entropy(m, s, a)
        else:
            lse = lanes_lse2(m, s)
    else:
        lse = finish_lse(m, s)
        if COMPUTE_ENTROPY:
            entropy = finish_entropy(s, a)
    return lse, entropy
