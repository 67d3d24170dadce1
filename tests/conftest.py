"""Test lane set-up: Triton kernels run through the interpreter when no GPU is present, and
tests marked ``gpu`` / ``cuda_ext`` / ``multi_gpu`` are skipped where the hardware is missing."""

import os

import pytest
import torch
from hypothesis import settings

# CI runs the property tests with a fixed seed (reproducible); locally they explore anew.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Must happen before any Triton kernel module is imported (kernels are imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count()
    from cepo_kernels._dispatch import cuda_extension_error

    ext_error = cuda_extension_error() if n_gpus else "no CUDA device"
    for item in items:
        if "gpu" in item.keywords and n_gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "multi_gpu" in item.keywords and n_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA devices"))
        if "cuda_ext" in item.keywords and ext_error:
            item.add_marker(pytest.mark.skip(reason=f"cuda extension unavailable: {ext_error}"))


def pytest_report_header(config):
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    return f"torch {torch.__version__}, CUDA devices: {torch.cuda.device_count()}, TRITON_INTERPRET={interpret}"
