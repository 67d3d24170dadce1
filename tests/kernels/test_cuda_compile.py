"""CPU checks of the CUDA sources in ``csrc/`` (no GPU needed): every ``.cu`` compiles with
``nvcc`` for ``sm_90`` without register spills, the registration block ``ops.cpp`` compiles with
the host compiler, a host-side test unit checks the kernels' shared math (online log-sum-exp and
entropy, the CEPO weighting), and the kernels run on the CPU under a small emulation of the CUDA
built-ins against float64. Skipped where ``nvcc`` is missing.

The compiles run in parallel, once per session (about two minutes on two cores: the torch
headers dominate). A CPU-only torch wheel lacks ``c10/cuda/impl/cuda_cmake_macros.h`` (a
generated one-line header); a stand-in is written to a temporary include folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
HOST_TEST = CSRC / "tests" / "online_softmax_host_test.cu"
EMULATION_TEST = CSRC / "tests" / "kernel_emulation_test.cpp"


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def include_flags(tmp: Path) -> list[str]:
    from torch.utils import cpp_extension

    dirs = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"], str(CSRC)]
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():  # CPU-only torch wheel
        shim = tmp / "c10/cuda/impl/cuda_cmake_macros.h"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(tmp))
    return [f"-I{d}" for d in dirs]


def nvcc_command(source: Path, out: Path, includes: list[str]) -> list[str]:
    from torch.utils import cpp_extension

    return [
        NVCC, "-c", "-arch=sm_90", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS,
        "-Xptxas=-warn-spills,-warn-lmem-usage", *includes, str(source), "-o", str(out),
    ]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Compile every csrc/*.cu (nvcc, sm_90), ops.cpp (host compiler) and the host test unit,
    in parallel. Returns the finished processes by name."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    includes = include_flags(tmp)
    jobs = {name: nvcc_command(CSRC / name, tmp / f"{name}.o", includes) for name in CU_FILES}
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx:
        jobs["ops.cpp"] = [cxx, "-std=c++20", "-c", *includes, str(CSRC / "ops.cpp"), "-o", str(tmp / "ops.o")]
    jobs["host_test"] = [NVCC, "-std=c++20", f"-I{CSRC}", str(HOST_TEST), "-o", str(tmp / "host_test")]
    # a .cpp through nvcc: the host compiler, with the CUDA include directory already on its path
    jobs["emulation_test"] = [
        NVCC, "-std=c++20", "-O1", "-Xcompiler=-pthread", f"-I{CSRC}", f"-I{CSRC / 'tests'}",
        str(EMULATION_TEST), "-o", str(tmp / "emulation_test"),
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=max(2, len(os.sched_getaffinity(0)))) as pool:
        futures = {name: pool.submit(run, cmd) for name, cmd in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["host_test_binary"] = tmp / "host_test"  # type: ignore[assignment]
    results["emulation_test_binary"] = tmp / "emulation_test"  # type: ignore[assignment]
    return results


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n$ {' '.join(proc.args)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def test_cuda_sources_exist():
    assert {"token_logprobs.cu", "contrastive_logprobs.cu", "contrastive_advantage.cu"} <= set(CU_FILES)
    for kernel_header in CSRC.glob("*_kernel.cuh"):
        text = kernel_header.read_text()
        assert "torch/" not in text and "ATen/" not in text, f"{kernel_header.name} must not include torch headers"


@pytest.mark.parametrize("name", CU_FILES)
def test_cuda_source_compiles_for_sm90(compiled, name):
    proc = compiled[name]
    assert proc.returncode == 0, _explain(proc)
    output = proc.stdout + proc.stderr
    assert "spill" not in output.lower() and "lmem" not in output.lower(), f"register spills or local memory:\n{output}"


def test_cuda_registration_block_compiles(compiled):
    if "ops.cpp" not in compiled:
        pytest.skip("no host C++ compiler (c++/g++) found")
    proc = compiled["ops.cpp"]
    assert proc.returncode == 0, _explain(proc)


def test_cuda_kernel_math_host_unit(compiled):
    """The online log-sum-exp / entropy state and the weighting, run on the host against float64."""
    proc = compiled["host_test"]
    assert proc.returncode == 0, _explain(proc)
    result = run([str(compiled["host_test_binary"])])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-4000:]


def test_cuda_kernels_on_cpu_emulation(compiled):
    """The kernels themselves (token_logprobs forward/backward, contrastive_logprobs,
    contrastive_advantage), compiled for the host and run with one CPU thread per CUDA thread
    (csrc/tests/cuda_host_emulation.h) against float64: every dtype, odd and unaligned rows,
    -inf and ignored rows; a misaligned 16-byte access aborts, as it faults on a GPU."""
    proc = compiled["emulation_test"]
    assert proc.returncode == 0, _explain(proc)
    result = run([str(compiled["emulation_test_binary"])])
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.stdout + result.stderr)[-4000:]


def test_setup_builds_extension_only_when_asked_or_possible(monkeypatch):
    """``pip install -e .`` stays pure Python on a CPU torch; CEPO_BUILD_CUDA=0 always skips."""
    import runpy

    import torch

    setup_ns = runpy.run_path(str(ROOT / "setup.py"), run_name="cepo_setup")  # does not call setup()
    decide = setup_ns["cuda_build_decision"]
    assert decide({"CEPO_BUILD_CUDA": "0"}) == (False, "CEPO_BUILD_CUDA=0")
    build, why = decide({})
    if torch.version.cuda is None:
        assert not build and "CPU-only" in why
        with pytest.raises(RuntimeError, match="CPU-only"):
            decide({"CEPO_BUILD_CUDA": "1"})
