"""The ``cuda`` backend slot: a thin wrapper over the optional compiled extension
``cepo_kernels._C`` built from ``csrc/``. Absent unless built; ``extension_error()`` says why."""

from __future__ import annotations

import functools


@functools.cache
def extension_error() -> str | None:
    """None when the compiled extension loads and CUDA is usable, else the reason."""
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        return f"torch does not import ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        from cepo_kernels import _C  # noqa: F401
    except ImportError as exc:
        return f"the extension cepo_kernels._C is not built ({exc}); see README 'CUDA extension'"
    return None


def has_op(name: str) -> bool:
    """True when the loaded extension provides ``name``."""
    try:
        from cepo_kernels.cuda import ops
    except ImportError:
        return False
    return hasattr(ops, f"{name}_fwd")
