"""Triton kernels for ``token_logprobs``: one program per row of logits.

Forward: one pass over the row with an online log-sum-exp (and entropy) in fp32, the
target logit read once as a scalar. Saves ``lse`` (and uses the entropy) for backward.

Backward: ``dx_j = (g * (1[j == y] - p_j) - h * p_j * (z_j - (lse - H))) / T`` with
``p_j = exp(z_j - lse)``, ``z = x / T``; terms with ``p_j == 0`` are 0. Ignored rows and
all-``-inf`` rows get a zero gradient. The full derivation is in
``cepo_kernels/reference/token_logprobs.py``.

One kernel per pass; the ``LOG2`` switch (configuration ``v2``, ``cepo_kernels/configs.py``)
runs the row in the log2 domain: the caller passes ``scale = log2(e) / T`` instead of ``1 / T``,
so each element costs one multiply and one ``exp2``, the state is kept per lane with one
reduction at the end of the row, and the target is compared as int32. Results are in nats
either way (``lse`` is stored in nats, so the backward of either setting reads either forward).

Offsets: the row index is widened to int64 before multiplying by the row stride, since
``N * V`` exceeds 2^31 at real sizes (8192 x 151936).
"""

import torch
import triton
import triton.language as tl

from cepo_kernels.triton import _launch
from cepo_kernels.triton._online_softmax import LN2_K, LOG2E_K, load_target, row_lse

__all__ = ["token_logprobs_bwd", "token_logprobs_fwd"]


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr,  # (N, V) fp16/bf16/fp32, last dim contiguous
    targets_ptr,  # (N,) int
    logp_ptr,  # (N,) fp32 out
    entropy_ptr,  # (N,) fp32 out (unused unless COMPUTE_ENTROPY)
    lse_ptr,  # (N,) fp32 out (nats), for backward
    # sizes and strides
    V,
    stride_logits_row,
    rows_inner,  # rows per outer index: (B, T, V) logits sliced [:, :-1] are read in place
    stride_logits_outer,  # stride of the outer index (0 for 2-D logits)
    # scalars
    scale,  # 1 / T, or log2(e) / T when LOG2
    ignore_index,
    # meta-parameters
    COMPUTE_ENTROPY: tl.constexpr,
    LOG2: tl.constexpr,  # v2: log2 domain, lane-wise state, int32 target compare
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = load_target(targets_ptr + row, LOG2)
    ignored = target == ignore_index
    row_ptr = logits_ptr + (row // rows_inner) * stride_logits_outer + (row % rows_inner) * stride_logits_row
    n_cols = tl.where(ignored, 0, V)  # ignored rows read nothing
    lse, entropy = row_lse(row_ptr, n_cols, V, scale, COMPUTE_ENTROPY, LOG2, BLOCK_V)
    z_t = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32) * scale
    logp = tl.where(lse == float("-inf"), float("-inf"), z_t - lse)
    if LOG2:  # back to nats
        logp = logp * LN2_K
        lse = lse * LN2_K
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr,  # (N, V) input logits
    targets_ptr,  # (N,) int
    lse_ptr,  # (N,) fp32 from forward (nats)
    entropy_ptr,  # (N,) fp32 from forward (unused unless HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) upstream gradient of logp (unused unless HAS_GRAD_LOGP)
    grad_entropy_ptr,  # (N,) upstream gradient of entropy (unused unless HAS_GRAD_ENTROPY)
    grad_logits_ptr,  # (N, V) out, logits dtype, row stride stride_grad_row
    # sizes and strides
    V,
    stride_logits_row,
    rows_inner,  # rows per outer index: (B, T, V) logits sliced [:, :-1] are read in place
    stride_logits_outer,  # stride of the outer index (0 for 2-D logits)
    stride_grad_row,
    # scalars
    scale,  # 1 / T, or log2(e) / T when LOG2
    inv_temperature,
    ignore_index,
    # meta-parameters
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    LOG2: tl.constexpr,  # v2: p = 2^(x * log2e / T - lse2), one multiply and one exp2 per element
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = load_target(targets_ptr + row, LOG2)
    lse = tl.load(lse_ptr + row)
    live = (target != ignore_index) & (lse != float("-inf"))
    if LOG2:
        lse_u = tl.where(live, lse * LOG2E_K, 0.0)  # log2 units, like z below
        g_scale = inv_temperature  # v2 folds 1/T into the upstream gradients once per row
    else:
        lse_u = tl.where(live, lse, 0.0)
        g_scale = 1.0
    g = tl.zeros((), tl.float32)
    h = tl.zeros((), tl.float32)
    mean_z = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.where(live, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0) * g_scale
    if HAS_GRAD_ENTROPY:
        h = tl.where(live, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0) * g_scale
        if LOG2:
            mean_z = lse_u - tl.load(entropy_ptr + row) * LOG2E_K
        else:
            mean_z = lse_u - tl.load(entropy_ptr + row)
    row_ptr = logits_ptr + (row // rows_inner) * stride_logits_outer + (row % rows_inner) * stride_logits_row
    out_ptr = grad_logits_ptr + row * stride_grad_row
    n_read = tl.where(live, V, 0)  # dead rows skip the read; their gradient is written as zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32) * scale
        if LOG2:
            p = tl.exp2(z - lse_u)
        else:
            p = tl.exp(z - lse_u)
        d = g * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            if LOG2:  # d/dz of H in log2 units of z: times ln 2
                d -= h * tl.where(p > 0, p * (z - mean_z), 0.0) * LN2_K
            else:
                d -= h * tl.where(p > 0, p * (z - mean_z), 0.0)
        if LOG2:
            d = tl.where(live, d, 0.0)
        else:
            d = tl.where(live, d * inv_temperature, 0.0)
        tl.store(out_ptr + cols, d.to(grad_logits_ptr.dtype.element_ty), mask=cols < V)


def _meta(v: int, element_size: int) -> dict:
    """Launch meta-parameters of the row kernels under the active configuration."""
    return dict(LOG2=_launch.row_settings()["log2"], BLOCK_V=_launch.block_v(v, element_size),
                num_warps=_launch.num_warps(v))  # fmt: skip


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward over ``logits (N, V)`` or ``(B, T, V)`` (last dim contiguous, any row
    strides), ``targets (N,)`` with ``N = B T``. Returns fp32 ``(logp, entropy or None, lse)``, each
    ``(N,)``."""
    v = logits.shape[-1]
    n = logits.shape[:-1].numel()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if want_entropy else logp
    if n > 0:
        _token_logprobs_fwd_kernel[(n,)](
            logits, targets, logp, entropy, lse,
            v, *_launch.row_strides(logits),
            _launch.row_scale(temperature), ignore_index,
            COMPUTE_ENTROPY=want_entropy, **_meta(v, logits.element_size()),
        )  # fmt: skip
    return logp, (entropy if want_entropy else None), lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Launch the backward; returns the gradient of ``logits`` (2-D or 3-D, contiguous) in its dtype."""
    v = logits.shape[-1]
    n = logits.shape[:-1].numel()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n > 0:
        _token_logprobs_bwd_kernel[(n,)](
            logits, targets, lse,
            entropy if entropy is not None else lse,
            grad_logp.contiguous() if grad_logp is not None else lse,
            grad_entropy.contiguous() if grad_entropy is not None else lse,
            grad,
            v, *_launch.row_strides(logits), v,
            _launch.row_scale(temperature), 1.0 / temperature, ignore_index,
            HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
            **_meta(v, logits.element_size()),
        )  # fmt: skip
    return grad
