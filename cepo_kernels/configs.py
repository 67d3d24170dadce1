"""Named kernel configurations, so that one GPU run can measure today's against the new ones.

``v1`` (the configurations every kernel shipped with before any GPU measurement; the default) or
``v2`` (the restructured kernels: log2-domain lane-wise row kernels, per-head-dim tree-attention
tiles and a Delta kernel, a grouped LM-head launch order with a fixed backward vocabulary chunk).
Each op has ONE Triton kernel per pass; a configuration only sets its ``tl.constexpr`` switches
and launch parameters. The default stays ``v1`` until a GPU measurement says ``v2`` is faster.

Choosing one, in code (a test, a benchmark, a trainer)::

    from cepo_kernels import configs

    with configs.use("v2"):           # for a block; restores the previous one after
        lp = cepo_kernels.token_logprobs(logits, targets)
    configs.select("v2")              # for the rest of the process

The launchers read the active name from a plain dict at launch (``torch.compile`` treats it as a
constant and guards on it); no environment variable is read. ``bench/`` takes
``--kernel-config v1|v2`` (``bench/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT = "v1"

CONFIGS: dict[str, dict[str, dict]] = {
    "v1": {
        # token_logprobs / contrastive_logprobs row kernels: 16 KiB of logits per step,
        # natural-log domain, int64 target compare, 8 warps from V >= 8192
        "token_logprobs": {"block_bytes": 16384, "log2": False, "num_warps_large": 8},
        # tree attention: (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim; Delta of the
        # backward in torch (three ops)
        "tree_attention": {
            "fwd": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
            "bwd": {64: (64, 64, 8, 1), 128: (64, 64, 8, 1)},
            "delta_kernel": False,
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
        # at 128 (dK/dV spills 16 B with 2 stages under Triton 3.6); Delta in one small kernel
        "tree_attention": {
            "fwd": {64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
            "bwd": {64: (64, 64, 4, 2), 128: (64, 64, 8, 1)},
            "delta_kernel": True,
        },
        # grouped (swizzled) launch order: 8 row blocks walk the vocabulary together; D-fastest
        # dh / dW matmul grids; a fixed backward vocabulary chunk (batch-invariant gradients);
        # 128 x 64 dh tiles (no spill)
        "linear_logprobs": {"group_m": 8, "dh_block_p": 64},
    },
}

# The process-wide choice: a plain dict (not a ContextVar) so that torch.compile reads it as a
# constant and guards on it.
_ACTIVE = {"name": DEFAULT}


def check_name(name: str) -> str:
    """``name`` if it names a configuration, else a ``ValueError`` listing them."""
    if name not in CONFIGS:
        raise ValueError(f"kernel config: expected one of {sorted(CONFIGS)}, got {name!r}")
    return name


def active_name() -> str:
    """The configuration the launchers use now (``v1`` unless selected otherwise)."""
    return _ACTIVE["name"]


def select(name: str) -> None:
    """Use configuration ``name`` from now on in this process."""
    _ACTIVE["name"] = check_name(name)


@contextmanager
def use(name: str) -> Iterator[str]:
    """Use configuration ``name`` inside a ``with`` block; the previous one is restored after."""
    previous = active_name()
    select(name)
    try:
        yield name
    finally:
        _ACTIVE["name"] = previous


def get(op: str, name: str | None = None) -> dict:
    """Launch parameters of ``op`` under configuration ``name`` (default: the active one)."""
    return CONFIGS[check_name(name or active_name())][op]
