"""Named kernel configurations, so that one GPU run can measure today's against the new ones.

``CEPO_KERNEL_CONFIG=v1`` (the configurations every kernel shipped with before any GPU
measurement) or ``v2`` (the restructured ones of issue 11); read once per launch, so a process
can switch by setting the variable (``bench/gpu_check.sh`` runs the whole benchmark suite under
each and compares them with pytest-benchmark). The default stays ``v1`` until a GPU measurement
says ``v2`` is faster; the measurement is recorded in ``docs/`` beside the op.

Each entry is a plain dict of launch parameters read by the Triton launchers; a key missing in
a configuration falls back to ``v1``.
"""

from __future__ import annotations

import os

DEFAULT = "v1"
ENV = "CEPO_KERNEL_CONFIG"

CONFIGS: dict[str, dict[str, dict]] = {
    "v1": {
        # token_logprobs / contrastive_logprobs row kernels: 16 KiB of logits per step,
        # natural-log domain, int64 target compare, 8 warps from V >= 8192
        "token_logprobs": {"block_bytes": 16384, "log2": False, "num_warps_large": 8},
        # tree attention: (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim
        "tree_attention": {
            "fwd": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
            "bwd": {64: (64, 64, 8, 1), 128: (64, 64, 8, 1)},
        },
        # fused LM head: row-block-fastest launch order (no grouping), vocabulary chunk of the
        # backward sized from N, square 128 x 128 tiles for the dh matmul (it spills on sm_90)
        "linear_logprobs": {"group_m": 1, "dh_block_p": 128},
    },
    "v2": {
        # log2-domain multiply (z * (log2e / T) once), one exp2 per element, lane-wise state with
        # one reduction at the end of the row (no barrier per step), int32 target compare; 16 KiB
        # steps (the lane state is 3 registers per element: 8192 bf16 / 256 threads = 32 each)
        "token_logprobs": {"block_bytes": 16384, "log2": True, "num_warps_large": 8},
        # FlexAttention-like: 128 x 64 / 8 warps / 3 stages forward at head dim 128 (64 x 64 / 4
        # warps / 3 stages at 64); backward 64 x 64, 4 warps / 2 stages at 64, 8 warps / 1 stage
        # at 128 (dK/dV spills 16 B with 2 stages under Triton 3.6)
        "tree_attention": {
            "fwd": {64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
            "bwd": {64: (64, 64, 4, 2), 128: (64, 64, 8, 1)},
        },
        # grouped (swizzled) launch order: 8 row blocks walk the vocabulary together; D-fastest
        # dh / dW matmul grids; a fixed backward vocabulary chunk (batch-invariant gradients);
        # 128 x 64 dh tiles (no spill)
        "linear_logprobs": {"group_m": 8, "dh_block_p": 64},
    },
}


def active_name() -> str:
    name = os.environ.get(ENV, DEFAULT) or DEFAULT
    if name not in CONFIGS:
        raise ValueError(f"{ENV}={name!r}: expected one of {sorted(CONFIGS)}")
    return name


def get(op: str) -> dict:
    """The active configuration of ``op`` (``v1`` values for keys the active one lacks)."""
    return {**CONFIGS[DEFAULT].get(op, {}), **CONFIGS[active_name()].get(op, {})}
