"""Host-side launch helpers shared by the Triton launchers (one place, no sibling's private names):
the active configuration's row-kernel settings, row strides of logits, and the ``tl.dot`` settings
for a dtype."""

from __future__ import annotations

import torch
import triton

from cepo_kernels import configs
from cepo_kernels._dispatch import triton_interpreting
from cepo_kernels.triton._online_softmax import LOG2E


def row_settings() -> dict:
    """The active configuration of the logits row kernels (``token_logprobs``,
    ``contrastive_logprobs``): ``block_bytes``, ``log2``, ``num_warps_large``."""
    return configs.get("token_logprobs")


def row_scale(temperature: float) -> float:
    """What the row kernels multiply a logit by: ``1 / T``, or ``log2(e) / T`` in the log2 domain."""
    return (LOG2E if row_settings()["log2"] else 1.0) / temperature


def block_v(v: int, element_size: int) -> int:
    """Vocabulary columns per step of a row kernel: ``block_bytes`` of logits (16 KiB is a good
    default on Hopper); a small vocabulary takes one block of the next power of two."""
    cap = row_settings()["block_bytes"] // element_size
    return max(16, min(cap, triton.next_power_of_2(v)))


def num_warps(v: int) -> int:
    return row_settings()["num_warps_large"] if v >= 8192 else 4


def row_strides(logits: torch.Tensor) -> tuple[int, int, int]:
    """``(stride_row, rows_inner, stride_outer)`` of 2-D ``(N, V)`` logits, or of 3-D ``(B, T, V)``
    logits whose rows do not have one stride (e.g. ``logits[:, :-1]``: read in place, no copy)."""
    if logits.dim() == 2:
        return logits.stride(0), max(1, logits.shape[0]), 0
    return logits.stride(1), max(1, logits.shape[1]), logits.stride(0)


def dot_meta(dtype: torch.dtype) -> dict:
    """``UPCAST`` / ``PRECISION`` constexprs of a kernel that calls ``tl.dot`` on ``dtype`` tiles.

    fp32 inputs get full fp32 products (``ieee``, not tf32): the fp32 path is the accuracy path;
    16-bit inputs ignore the flag. Under the interpreter (Triton 3.9), whose bf16 ``tl.dot``
    multiplies the raw bits and whose fp32 one is a CPU BLAS call, ``UPCAST`` makes the kernels
    multiply in a wider type (each kernel's ``UPCAST`` branch says which)."""
    interpreting = triton_interpreting()
    return {
        "UPCAST": interpreting,
        "PRECISION": "ieee" if dtype == torch.float32 or interpreting else "tf32",
    }
