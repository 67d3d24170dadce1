"""Just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load``, for the GPU check
script and for machines where the package was installed without the extension.

``load()`` compiles the sources once (cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and loads the library into the process, which registers the ops
as ``torch.ops.cepo.*``. The architectures come from ``TORCH_CUDA_ARCH_LIST`` when set, else
from the visible GPU. Needs a source checkout (``csrc/`` beside the package), a CUDA toolkit
(``nvcc``) and a CUDA build of torch.
"""

from __future__ import annotations

from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = ["-O3", "-lineinfo"]  # cpp_extension adds the C++ standard and the half/bf16 defines
CXX_FLAGS = ["-O3"]


def sources() -> list[str]:
    """The extension's sources: every ``csrc/*.cu`` plus ``csrc/ops.cpp`` (the registration)."""
    if not CSRC.is_dir():
        raise FileNotFoundError(f"{CSRC} not found: the JIT build needs a source checkout of cepo")
    return [str(p) for p in sorted(CSRC.glob("*.cu"))] + [str(CSRC / "ops.cpp")]


def load(verbose: bool = False) -> None:
    """Compile (if needed) and load the extension; afterwards ``torch.ops.cepo.*`` exist."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="cepo_kernels_C",
        sources=sources(),
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=verbose,
    )
