"""The one benchmark harness (pytest-benchmark) of the ops: ``pytest bench/ --benchmark-only``.

Files are ``bench/bench_<op>.py`` (collected by :func:`pytest_collect_file` below; the whole-step
tools, ``bench_rollout.py`` and every ``bench_*_step.py``, are scripts with their own command line,
not collected). Every case runs each implementation (eager PyTorch, every usable cepo backend, the
public peers when importable: Liger, Cut Cross-Entropy, FlexAttention, TRL's ``trl.kernels``)
through the ``measure`` fixture, which

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

- on a GPU records the peak memory one call allocates beyond what existed (``peak_extra_bytes``).

Shapes: ``--bench-size full`` (the GPU default: the targets' shapes) or ``tiny`` (the CPU
default). The kernel configuration under test is ``--kernel-config v1|v2`` (default v1, see
``cepo_kernels/configs.py``); it is recorded in each case's ``extra_info`` (not in the test
names), so two runs under two configurations compare with ``--benchmark-compare``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.common import git_sha

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # correctness checks of the Triton kernels on the CPU


BENCH_DIR = Path(__file__).resolve().parent
# whole-step tools (scripts with their own command line, not pytest-benchmark files): these and
# every bench_*_step.py
STEP_TOOLS = {"bench_rollout.py", "bench_vision_experience.py"}
BACKENDS = ("cuda", "triton", "torch")


def pytest_addoption(parser):
    group = parser.getgroup("cepo bench")
    group.addoption("--bench-size", choices=("auto", "tiny", "full"), default="auto",
                    help="shapes: full (GPU default), tiny (CPU default)")  # fmt: skip
    group.addoption("--kernel-config", choices=("v1", "v2"), default="v1",
                    help="the named kernel configuration to measure (cepo_kernels/configs.py)")  # fmt: skip


def pytest_configure(config):
    from cepo_kernels import configs

    configs.select(config.getoption("--kernel-config"))


def pytest_collect_file(file_path, parent):
    """Collect ``bench/bench_<op>.py`` (the project's ``python_files`` pattern is ``test_*.py``)."""
    if (
        file_path.parent == BENCH_DIR
        and file_path.name.startswith("bench_")
        and file_path.suffix == ".py"
        and file_path.name not in STEP_TOOLS
        and not file_path.name.endswith("_step.py")
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def size(request) -> str:
    s = request.config.getoption("--bench-size")
    return ("full" if CUDA else "tiny") if s == "auto" else s


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if CUDA else "cpu"


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
    machine_info["git_sha"] = git_sha()
    machine_info.update(ceilings())


_FLUSH: dict = {}


def _flush_l2() -> None:
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _FLUSH["buf"].zero_()
    torch.cuda.synchronize()


def _peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes one call of ``fn`` allocates beyond what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


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
            b.extra_info["peak_extra_bytes"] = _peak_extra_bytes(fn)

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


def skip_unusable(impl: str, tensors) -> None:
    """Skip the case when ``impl`` is a cepo backend that cannot run on ``tensors`` here."""
    if impl in BACKENDS and not usable(impl, tensors):
        pytest.skip(f"{impl} cannot run here")


def peer(module: str, why: str = ""):
    """Import a peer library's module, or skip the case saying why not (any import failure: a
    peer built for other versions may raise more than ImportError)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:
        pytest.skip(f"{module} does not import{why}: {type(exc).__name__}: {exc}"[:300])


def close(got, want, atol: float, rtol: float) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


# logits-path cases (token_logprobs, contrastive_logprobs): bf16 logits N x V
LOGITS_SHAPES = {"full": (8192, 151936), "tiny": (64, 3203)}


@pytest.fixture(scope="session")
def logits_data(size, device):
    """Three bf16 ``(N, V)`` logits streams (standard deviation 3) and ``(N,)`` targets."""
    n, v = LOGITS_SHAPES[size]
    g = torch.Generator(device=device).manual_seed(0)
    streams = [(torch.randn(n, v, device=device, generator=g) * 3).to(torch.bfloat16) for _ in range(3)]
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    return streams, targets


def eager_logprobs(logits, targets):
    """The eager baseline: an fp32 ``log_softmax`` of the whole logits, then a gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
