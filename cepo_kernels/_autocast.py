"""``torch.autocast`` at the front door of the ops that contain a matmul (the LM-head ops).

Inside ``torch.autocast`` (accelerate, TRL and Lightning run bf16 mixed precision this way) a
plain ``F.linear(hidden, weight)`` multiplies in the autocast dtype. The LM-head ops do the same,
explicitly and once: :func:`cast_inputs` casts the float inputs (not float64, which autocast
leaves alone) to the autocast dtype of their device, and the op's forward and backward then run
with autocast turned off (:func:`disabled`), so the fp32 accumulation inside is never re-cast
and the backward recomputes exactly what the forward computed, from the same rounded inputs.
The gradient of an fp32 leaf is then the gradient with respect to its rounded copy, cast back
by autograd (what ``F.linear`` under autocast gives too). Outside autocast nothing changes.
"""

from __future__ import annotations

import contextlib

import torch


def cast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` as autocast would feed them to a matmul: float tensors other than float64 in
    the autocast dtype of their device when autocast is on there; unchanged otherwise."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (a no-op context when it is off already)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
