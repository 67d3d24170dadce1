"""Triton kernels for ``token_logprobs``: one program per row of logits.

Forward: one pass over the row with an online log-sum-exp (and entropy) in fp32, the
target logit read once as a scalar. Saves ``lse`` (and uses the entropy) for backward.

Backward: ``dx_j = (g * (1[j == y] - p_j) - h * p_j * (z_j - (lse - H))) / T`` with
``p_j = exp(z_j - lse)``, ``z = x / T``; terms with ``p_j == 0`` are 0. Ignored rows and
all-``-inf`` rows get a zero gradient. The full derivation is in
``cepo_kernels/reference/token_logprobs.py``.

Offsets: the row index is widened to int64 before multiplying by the row stride, since
``N * V`` exceeds 2^31 at real sizes (8192 x 151936).
"""

import torch
import triton
import triton.language as tl

from cepo_kernels.triton._online_softmax import (
    finish_entropy,
    finish_lse,
    lane_entropy_update,
    lane_lse_update,
    lanes_lse2,
    lanes_lse2_entropy,
    online_entropy_update,
    online_lse_update,
)

LOG2E = 1.4426950408889634


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr,  # (N, V) fp16/bf16/fp32, last dim contiguous
    targets_ptr,  # (N,) int
    logp_ptr,  # (N,) fp32 out
    entropy_ptr,  # (N,) fp32 out (unused unless COMPUTE_ENTROPY)
    lse_ptr,  # (N,) fp32 out, for backward
    # sizes and strides
    V,
    stride_logits_row,
    rows_inner,  # rows per outer index: (B, T, V) logits sliced [:, :-1] are read in place
    stride_logits_outer,  # stride of the outer index (0 for 2-D logits)
    # scalars
    inv_temperature,
    ignore_index,
    # meta-parameters
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    row_ptr = logits_ptr + (row // rows_inner) * stride_logits_outer + (row % rows_inner) * stride_logits_row
    n_cols = tl.where(ignored, 0, V)  # ignored rows read nothing
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
        if COMPUTE_ENTROPY:
            m, s, a = online_entropy_update(m, s, a, z)
        else:
            m, s = online_lse_update(m, s, z)
    lse = finish_lse(m, s)
    z_t = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32) * inv_temperature
    logp = tl.where(lse == float("-inf"), float("-inf"), z_t - lse)
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, finish_entropy(s, a)))


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr,  # (N, V) input logits
    targets_ptr,  # (N,) int
    lse_ptr,  # (N,) fp32 from forward
    entropy_ptr,  # (N,) fp32 from forward (unused unless HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # (N,) upstream gradient of logp (unused unless HAS_GRAD_LOGP)
    grad_entropy_ptr,  # (N,) upstream gradient of entropy (unused unless HAS_GRAD_ENTROPY)
    grad_logits_ptr,  # (N, V) out, logits dtype, contiguous
    # sizes and strides
    V,
    stride_logits_row,
    rows_inner,  # rows per outer index: (B, T, V) logits sliced [:, :-1] are read in place
    stride_logits_outer,  # stride of the outer index (0 for 2-D logits)
    stride_grad_row,
    # scalars
    inv_temperature,
    ignore_index,
    # meta-parameters
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    live = (target != ignore_index) & (lse != float("-inf"))
    lse_safe = tl.where(live, lse, 0.0)
    g = tl.zeros((), tl.float32)
    h = tl.zeros((), tl.float32)
    mean_z = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.where(live, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0)
    if HAS_GRAD_ENTROPY:
        h = tl.where(live, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0)
        mean_z = lse_safe - tl.load(entropy_ptr + row)
    row_ptr = logits_ptr + (row // rows_inner) * stride_logits_outer + (row % rows_inner) * stride_logits_row
    out_ptr = grad_logits_ptr + row * stride_grad_row
    n_read = tl.where(live, V, 0)  # dead rows skip the read; their gradient is written as zeros
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse_safe)
        d = g * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            d -= h * tl.where(p > 0, p * (z - mean_z), 0.0)
        d = tl.where(live, d * inv_temperature, 0.0)
        tl.store(out_ptr + cols, d.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _token_logprobs_fwd_v2_kernel(
    # pointers
    logits_ptr,  # (N, V) fp16/bf16/fp32, last dim contiguous, row stride stride_logits_row
    targets_ptr,  # (N,) int
    logp_ptr,  # (N,) fp32 out
    entropy_ptr,  # (N,) fp32 out (unused unless COMPUTE_ENTROPY)
    lse_ptr,  # (N,) fp32 out (natural log), for backward
    # sizes and strides
    V,
    stride_logits_row,
    rows_inner,  # rows per outer index: (B, T, V) logits sliced [:, :-1] are read in place
    stride_logits_outer,  # stride of the outer index (0 for 2-D logits)
    # scalars
    scale2,  # log2(e) / T: logits -> log2 units in one multiply
    ignore_index,
    # meta-parameters
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Configuration v2 of the forward: lane-wise online log-sum-exp in the log2 domain (one
    multiply, one exp2 per element, no reduction or barrier in the loop, one at the end)."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int32)
    ignored = target == ignore_index
    row_ptr = logits_ptr + (row // rows_inner) * stride_logits_outer + (row % rows_inner) * stride_logits_row
    n_cols = tl.where(ignored, 0, V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    a = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale2
        if COMPUTE_ENTROPY:
            m, s, a = lane_entropy_update(m, s, a, z)
        else:
            m, s = lane_lse_update(m, s, z)
    if COMPUTE_ENTROPY:
        lse2, entropy = lanes_lse2_entropy(m, s, a)
    else:
        lse2 = lanes_lse2(m, s)
    z_t = tl.load(row_ptr + tl.where(ignored, 0, target)).to(tl.float32) * scale2
    logp = tl.where(lse2 == float("-inf"), float("-inf"), (z_t - lse2) * 0.6931471805599453)
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse2 * 0.6931471805599453))
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))


@triton.jit
def _token_logprobs_bwd_v2_kernel(
    # pointers
    logits_ptr,  # (N, V) input logits
    targets_ptr,  # (N,) int
    lse_ptr,  # (N,) fp32 from forward (natural log)
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
    scale2,  # log2(e) / T
    inv_temperature,
    ignore_index,
    # meta-parameters
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Configuration v2 of the backward: ``p = 2^(x * log2e / T - lse2)`` (one FMA-able multiply
    and one exp2 per element), an int32 target compare."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int32)
    lse = tl.load(lse_ptr + row)
    live = (target != ignore_index) & (lse != float("-inf"))
    lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
    g = tl.zeros((), tl.float32)
    h = tl.zeros((), tl.float32)
    mean2 = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.where(live, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0) * inv_temperature
    if HAS_GRAD_ENTROPY:
        # d/dz of H, in log2 units of z: p (z2 - mean2) ln2 ... times 1/T
        h = tl.where(live, tl.load(grad_entropy_ptr + row).to(tl.float32), 0.0) * inv_temperature
        mean2 = lse2 - tl.load(entropy_ptr + row) * 1.4426950408889634
    row_ptr = logits_ptr + (row // rows_inner) * stride_logits_outer + (row % rows_inner) * stride_logits_row
    out_ptr = grad_logits_ptr + row * stride_grad_row
    n_read = tl.where(live, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z2 = tl.load(row_ptr + cols, mask=cols < n_read, other=float("-inf")).to(tl.float32) * scale2
        p = tl.exp2(z2 - lse2)
        d = g * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            d -= h * tl.where(p > 0, p * (z2 - mean2), 0.0) * 0.6931471805599453
        d = tl.where(live, d, 0.0)
        tl.store(out_ptr + cols, d.to(grad_logits_ptr.dtype.element_ty), mask=cols < V)


def _config() -> dict:
    from cepo_kernels import configs

    return configs.get("token_logprobs")


def _block_v(v: int, element_size: int) -> int:
    # 16 KiB of logits per block iteration is a good default on Hopper (v1; v2 takes the
    # configured block_bytes); small vocabularies use one block of the next power of two.
    cap = _config()["block_bytes"] // element_size
    return max(16, min(cap, triton.next_power_of_2(v)))


def _num_warps(v: int) -> int:
    return _config()["num_warps_large"] if v >= 8192 else 4


def _row_strides(logits: torch.Tensor) -> tuple[int, int, int]:
    """``(stride_row, rows_inner, stride_outer)`` of 2-D ``(N, V)`` logits, or of 3-D ``(B, T, V)``
    logits whose rows do not have one stride (e.g. ``logits[:, :-1]``: read in place, no copy)."""
    if logits.dim() == 2:
        return logits.stride(0), max(1, logits.shape[0]), 0
    return logits.stride(1), max(1, logits.shape[1]), logits.stride(0)


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, want_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward over ``logits (N, V)`` or ``(B, T, V)`` (last dim contiguous, any row
    strides), ``targets (N,)`` with ``N = B T``. Returns fp32 ``(logp, entropy or None, lse)``, each
    ``(N,)``."""
    v = logits.shape[-1]
    n = logits.numel() // max(1, v) if v else logits.shape[:-1].numel()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if want_entropy else logp
    if n > 0 and _config()["log2"]:
        _token_logprobs_fwd_v2_kernel[(n,)](
            logits, targets, logp, entropy, lse,
            v, *_row_strides(logits),
            LOG2E / temperature, ignore_index,
            COMPUTE_ENTROPY=want_entropy, BLOCK_V=_block_v(v, logits.element_size()),
            num_warps=_num_warps(v),
        )  # fmt: skip
    elif n > 0:
        _token_logprobs_fwd_kernel[(n,)](
            logits, targets, logp, entropy, lse,
            v, *_row_strides(logits),
            1.0 / temperature, ignore_index,
            COMPUTE_ENTROPY=want_entropy, BLOCK_V=_block_v(v, logits.element_size()),
            num_warps=_num_warps(v),
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
        dummy = lse
        common = (
            entropy if entropy is not None else dummy,
            grad_logp.contiguous() if grad_logp is not None else dummy,
            grad_entropy.contiguous() if grad_entropy is not None else dummy,
            grad,
            v, *_row_strides(logits), v,
        )  # fmt: skip
        meta = dict(HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
                    BLOCK_V=_block_v(v, logits.element_size()), num_warps=_num_warps(v))  # fmt: skip
        if _config()["log2"]:
            _token_logprobs_bwd_v2_kernel[(n,)](
                logits, targets, lse, *common, LOG2E / temperature, 1.0 / temperature, ignore_index, **meta
            )
        else:
            _token_logprobs_bwd_kernel[(n,)](logits, targets, lse, *common, 1.0 / temperature, ignore_index, **meta)
    return grad
