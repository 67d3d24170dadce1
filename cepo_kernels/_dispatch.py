"""Backend choice for every op, in one place.

Each op names the backends it implements, in order of preference. A backend is
usable for a call when its package imports, the tensors live where it can run,
and the dtypes are ones it supports. ``backend="auto"`` takes the first usable
backend in the op's order; an explicit backend that cannot run raises a
``ValueError`` that lists why each candidate was rejected.

The choice is made once per call and the op's autograd Function keeps it, so a
forward and its backward always run on the same backend.

The order is static, in each op's module (``ORDER``): nothing on this path reads a file, so
``torch.compile(fullgraph=True)`` can trace a call even as the first one of a process. A GPU
benchmark run prints the measured order per card (``python -m bench.results_jsonl --write-order``);
an op's ``ORDER`` changes only when such a measurement says so.

Backends:
- ``torch``:  plain PyTorch, fp32 math (fp64 for fp64 inputs); always usable.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors when the interpreter
  is on (``TRITON_INTERPRET=1``, used by the tests).
- ``cuda``:   the optional compiled extension ``cepo_kernels._C`` (``csrc/``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

BACKENDS = ("cuda", "triton", "torch")
LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_UNSET = object()
_cache: dict[str, str | None] = {}  # a plain dict, not functools.cache: torch.compile reads it as a constant


def triton_import_error() -> str | None:
    """None when ``triton`` imports, else why it does not (cached)."""
    err = _cache.get("triton", _UNSET)
    if err is _UNSET:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            err = None
        except Exception as exc:  # ImportError, or a broken install
            err = f"triton does not import ({type(exc).__name__}: {exc})"
        _cache["triton"] = err
    return err


def cuda_extension_error() -> str | None:
    """None when the compiled extension ``cepo_kernels._C`` loads, else why not (cached)."""
    err = _cache.get("cuda", _UNSET)
    if err is _UNSET:
        from cepo_kernels.cuda import extension_error

        err = extension_error()
        _cache["cuda"] = err
    return err


def _tensors(tensors: Iterable[torch.Tensor | None]) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]


def why_not(
    backend: str,
    tensors: Sequence[torch.Tensor | None],
    *,
    dtypes: Sequence[torch.dtype] = LOW_PRECISION,
    op: str = "",
) -> str | None:
    """Return None if ``backend`` can run on ``tensors``, else the reason it cannot.

    ``dtypes`` are the floating dtypes that backend's kernel accepts for this op.
    """
    ts = _tensors(tensors)
    devices = {t.device.type for t in ts}
    float_dtypes = {t.dtype for t in ts if t.is_floating_point()}
    if backend == "torch":
        return None
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if devices - {"cuda", "cpu"}:
            return f"tensors on {sorted(devices)}; triton runs on cuda (or cpu when interpreting)"
        if "cpu" in devices and not triton_interpreting():
            return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        if "cuda" in devices and triton_interpreting():
            return "TRITON_INTERPRET=1 is set, which runs kernels on the CPU only"
    elif backend == "cuda":
        if devices != {"cuda"}:
            return f"tensors on {sorted(devices) or ['cpu']}; the cuda backend needs CUDA tensors"
        err = cuda_extension_error()
        if err:
            return err
        from cepo_kernels.cuda import has_op

        if op and not has_op(op):
            return f"the compiled extension has no op {op!r}"
    else:
        return f"unknown backend {backend!r}"
    bad = float_dtypes - set(dtypes)
    if bad:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in bad))
        ok = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {names} not supported by the {backend} kernel (supports {ok})"
    return None


def resolve(
    op: str,
    requested: str,
    order: Sequence[str],
    tensors: Sequence[torch.Tensor | None],
    *,
    dtypes: dict[str, Sequence[torch.dtype]] | None = None,
) -> str:
    """Pick the backend that runs ``op`` for this call.

    Args:
        op: the op's public name (for messages and the cuda op lookup).
        requested: ``"auto"`` or one of ``order``.
        order: the backends that implement ``op``, fastest first.
        tensors: the call's tensors (``None`` entries are skipped).
        dtypes: per backend, the float dtypes its kernel takes (default fp16/bf16/fp32).

    Raises:
        ValueError: unknown ``requested``, or no candidate can run; the message
            gives each candidate's reason.
    """
    dtypes = dtypes or {}
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {list(order)} for {op}, got {requested!r}")
    if requested != "auto" and requested not in order:
        raise ValueError(f"backend: {op} has no {requested!r} implementation; expected 'auto' or one of {list(order)}")
    candidates = list(order) if requested == "auto" else [requested]
    reasons = []
    for name in candidates:
        reason = why_not(name, tensors, dtypes=dtypes.get(name, LOW_PRECISION), op=op)
        if reason is None:
            if requested == "auto" and name == "triton" and _on_cpu(tensors):
                # The interpreter is a correctness tool, far slower than torch on CPU.
                reasons.append("triton: skipped by auto on CPU (the interpreter is slow)")
                continue
            return name
        reasons.append(f"{name}: {reason}")
    raise ValueError(f"backend: no backend can run {op} here ({'; '.join(reasons)})")


def _on_cpu(tensors: Sequence[torch.Tensor | None]) -> bool:
    return all(t.device.type == "cpu" for t in _tensors(tensors))


def explain(op: str, order: Sequence[str], tensors: Sequence[torch.Tensor | None], **kw) -> str:
    """One line saying which backend ``auto`` picks for these tensors, and why."""
    try:
        chosen = resolve(op, "auto", order, tensors, **kw)
    except ValueError as exc:
        return f"none: {exc}"
    skipped = []
    for name in order:
        if name == chosen:
            break
        reason = why_not(name, tensors, op=op) or "skipped by auto on CPU (the interpreter is slow)"
        skipped.append(f"{name}: {reason}")
    return chosen + (f"  (skipped {'; '.join(skipped)})" if skipped else "")
