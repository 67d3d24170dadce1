"""pytest-benchmark harness of the microbenchmarks: ``pytest bench/ --benchmark-only``.

Every ``bench/test_<op>.py`` case runs each implementation (eager PyTorch, every usable cepo
backend, the public peers when importable) through the ``measure`` fixture, which

- checks correctness first (a case whose check fails is an error, never a timing),
- groups the results per case (``benchmark.group``), so the table compares implementations,
- on a GPU times one call per round with ``torch.cuda.synchronize()`` inside the timed call (GPU
  time, not the host time of an async launch), the L2 cache flushed in the untimed setup,
- on a CPU times only eager and torch-backend calls on small shapes; Triton through the
  interpreter is checked but not timed (its time means nothing),
- stores the bytes moved and FLOPs of the case in ``extra_info``, so
  ``python -m bench.results_jsonl BENCH.json`` turns ``--benchmark-json`` output into
  ``bench/results/<card>.jsonl`` rows with GB/s and TFLOP/s against the card's ceilings (copy
  bandwidth and bf16 matmul, measured once per session and stored in ``machine_info``).

Shapes: ``--bench-size full`` (the GPU default: the targets' shapes) or ``tiny`` (the CPU
default). The kernel configuration under test is ``CEPO_KERNEL_CONFIG`` (see
``cepo_kernels/configs.py``); it is recorded in each case's ``extra_info`` (not in the test
names), so two runs under two configurations compare with ``--benchmark-compare``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # correctness checks of the Triton kernels on the CPU


def pytest_addoption(parser):
    group = parser.getgroup("cepo bench")
    group.addoption("--bench-size", choices=("auto", "tiny", "full"), default="auto",
                    help="shapes: full (GPU default), tiny (CPU default)")  # fmt: skip


@pytest.fixture(scope="session")
def size(request) -> str:
    s = request.config.getoption("--bench-size")
    return ("full" if CUDA else "tiny") if s == "auto" else s


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if CUDA else "cpu"


def _git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root,
                             timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


_CEILINGS: dict = {}


def ceilings() -> dict:
    """The card's measured ceilings, once per session: copy bandwidth (read + write, bytes/s)
    and a bf16 matmul (FLOP/s). Empty on a CPU."""
    if CUDA and not _CEILINGS:
        import triton.testing

        src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100)
        _CEILINGS["copy_bytes_per_s"] = 2 * src.numel() / (ms * 1e-3)
        del src, dst
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ a, warmup=25, rep=100)
        _CEILINGS["bf16_matmul_flop_per_s"] = 2 * 8192**3 / (ms * 1e-3)
    return _CEILINGS


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["card"] = torch.cuda.get_device_name().replace(" ", "_") if CUDA else "cpu"
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except Exception:
        machine_info["triton"] = None
    machine_info["git_sha"] = _git_sha()
    machine_info.update(ceilings())


_FLUSH: dict = {}


def _flush_l2() -> None:
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _FLUSH["buf"].zero_()
    torch.cuda.synchronize()


class Measure:
    """``measure(impl, fn, check=..., bytes=..., flops=...)``: check, then time ``fn`` (see module doc)."""

    def __init__(self, benchmark, request):
        self.benchmark = benchmark
        self.request = request

    def __call__(
        self,
        group: str,
        impl: str,
        fn: Callable[[], object],
        *,
        check: Callable[[], object] | None = None,
        bytes_moved: float | None = None,
        flops: float | None = None,
        interpreted: bool = False,
        rounds: int | None = None,
        **info,
    ) -> None:
        from cepo_kernels import configs

        if check is not None:
            check()  # raises: a wrong result is never timed
        b = self.benchmark
        b.group = group
        b.extra_info.update(case=group, impl=impl, bytes=bytes_moved, flops=flops,
                            config=configs.active_name(), **info)  # fmt: skip
        if interpreted and not CUDA:
            pytest.skip(f"{impl}: Triton through the interpreter is checked, not timed")
        if CUDA:

            def timed():
                fn()
                torch.cuda.synchronize()

            fn()
            torch.cuda.synchronize()
            b.pedantic(timed, setup=_flush_l2, rounds=rounds or 30, warmup_rounds=3, iterations=1)
        else:
            b.pedantic(fn, rounds=rounds or 5, warmup_rounds=1, iterations=1)


@pytest.fixture
def measure(benchmark, request) -> Measure:
    return Measure(benchmark, request)


def usable(backend: str, tensors) -> bool:
    """Whether ``backend`` can run here on ``tensors`` (the interpreter counts on a CPU)."""
    from cepo_kernels import _dispatch

    return _dispatch.why_not(backend, tensors) is None
