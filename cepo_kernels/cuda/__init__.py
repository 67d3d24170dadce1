"""The ``cuda`` backend slot: a thin wrapper over the optional compiled extension
``cepo_kernels._C`` built from ``csrc/``. Absent unless built; ``extension_error()`` says why.

How the extension gets here (docs/cuda_extension.md):

- built with the package: ``CEPO_BUILD_CUDA=1 pip install --no-build-isolation -e .`` (or
  automatically when a CUDA toolkit and a CUDA build of torch are both present);
- or built just in time on first use when ``CEPO_CUDA_JIT=1`` is set (``cepo_kernels/cuda/jit.py``,
  used by the GPU check script).

Importing ``cepo_kernels`` never loads it: the op front doors ask ``extension_error()`` only when
they consider the ``cuda`` backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os

# The ops the extension registers under ``torch.ops.cepo``.
OP_NAMES = ("token_logprobs_fwd", "token_logprobs_bwd", "contrastive_logprobs_fwd", "contrastive_advantage_fwd")


def _registered() -> bool:
    import torch

    return all(hasattr(torch.ops.cepo, name) for name in OP_NAMES)


def _import_or_build() -> str | None:
    """Import the built module, else JIT-build ``csrc/`` when ``CEPO_CUDA_JIT=1``; None or why not."""
    try:
        from cepo_kernels import _C  # noqa: F401  (importing it registers torch.ops.cepo.*)
    except ImportError as exc:
        if os.environ.get("CEPO_CUDA_JIT", "0") in ("", "0"):
            return (
                f"the extension cepo_kernels._C is not built ({exc}); build it with "
                "CEPO_BUILD_CUDA=1 pip install --no-build-isolation -e . or set CEPO_CUDA_JIT=1 "
                "(see docs/cuda_extension.md)"
            )
        from cepo_kernels.cuda import jit

        try:
            jit.load()
        except Exception as jit_exc:  # a compiler error, a missing toolkit, ...
            return f"the JIT build of csrc/ failed ({type(jit_exc).__name__}: {jit_exc})"
    return None


def _load() -> str | None:
    """Make ``torch.ops.cepo.*`` available with their fake functions; None or why it failed."""
    if not _registered():
        reason = _import_or_build()
        if reason:
            return reason
        if not _registered():
            return "the extension loaded but did not register every torch.ops.cepo op"
    from cepo_kernels.cuda import ops

    ops.register_fakes()
    return None


@functools.cache
def extension_error() -> str | None:
    """None when the compiled extension loads and CUDA is usable, else the reason."""
    try:
        import torch
    except Exception as exc:  # pragma: no cover - torch is a hard dependency
        return f"torch does not import ({exc})"
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is available"
        built = "built" if importlib.util.find_spec("cepo_kernels._C") is not None else "not built"
        return f"{why}; the cuda backend needs a CUDA device (cepo_kernels._C is {built})"
    return _load()


def has_op(name: str) -> bool:
    """True when the loaded extension provides ``name`` (its ``<name>_fwd`` op)."""
    if extension_error() is not None:
        return False
    import torch

    return hasattr(torch.ops.cepo, f"{name}_fwd")
