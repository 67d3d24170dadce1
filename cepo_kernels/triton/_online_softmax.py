"""Shared Triton helpers: an online log-sum-exp (and entropy accumulator) over blocks.

State per row, all fp32 scalars: ``m`` the running max (starts at -inf), ``s`` the sum of
``exp(z - m)``, ``a`` the sum of ``exp(z - m) * (z - m)``. Columns that do not exist
(past ``V``) must be loaded as ``-inf``, never 0. When every value seen so far is ``-inf``
the state stays ``(-inf, 0, 0)``.
"""

import triton
import triton.language as tl


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
