"""``python -m cepo_kernels.info``: versions, devices, and the backend each op would use.

Each op is asked for a small CPU input and, when CUDA is available, a CUDA input; the line
says which backend ``auto`` picks and why the faster ones were skipped.
"""

from __future__ import annotations

import importlib
import platform

import torch

from cepo_kernels import _dispatch

# The modules (one per op) that define ``OP`` and ``ORDER``.
OP_MODULES = (
    "token_logprobs",
    "contrastive_logprobs",
    "contrastive_advantage",
    "linear_token_logprobs",
    "linear_contrastive_logprobs",
    "tree_attention",
)


def op_table() -> dict[str, tuple[str, ...]]:
    """Every public op's name and backend order (fastest first)."""
    ops = {}
    for name in OP_MODULES:
        try:
            module = importlib.import_module(f"cepo_kernels.{name}")
        except ImportError:  # an op whose module is not part of this version
            continue
        ops[module.OP] = module.ORDER
    ops["group_advantages"] = ("torch",)
    return ops


def report() -> str:
    lines = [
        f"cepo_kernels {__import__('cepo_kernels').__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    try:
        import triton

        lines.append(
            f"triton {triton.__version__}  (TRITON_INTERPRET={'on' if _dispatch.triton_interpreting() else 'off'})"
        )
    except Exception as exc:
        lines.append(f"triton: not usable ({exc})")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("device: CPU only (no CUDA device)")
    ext = _dispatch.cuda_extension_error()
    lines.append("cuda extension: " + ("loaded" if ext is None else f"absent: {ext}"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append("")
    lines.append("backend that 'auto' picks, per op and device:")
    for op, order in op_table().items():
        for dev in devices:
            probe = torch.zeros(2, 8, device=dev, dtype=torch.bfloat16)
            lines.append(f"  {op:30s} {dev:4s} -> {_dispatch.explain(op, order, [probe])}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
