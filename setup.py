"""Pure Python by default. The optional CUDA extension ``cepo_kernels._C`` (``csrc/``) is built
when asked for or when it can be (docs/cuda_extension.md):

- ``CEPO_BUILD_CUDA=1``: build it (an error if torch or the CUDA toolkit is missing);
- ``CEPO_BUILD_CUDA=0``: never build it;
- unset: build it only when torch imports here, is a CUDA build, and a CUDA toolkit (nvcc) is
  found. pip's isolated build environment has no torch, so a plain ``pip install -e .`` stays
  pure Python; use ``pip install --no-build-isolation -e .`` to build against the installed torch.

Architectures come from ``TORCH_CUDA_ARCH_LIST`` (default ``9.0+PTX``: Hopper, plus PTX that
newer GPUs compile at load time).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "9.0+PTX"


def cuda_build_decision(environ=os.environ) -> tuple[bool, str]:
    """(build the extension?, why) from the environment and the installed torch."""
    flag = environ.get("CEPO_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, "CEPO_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:
        if flag == "1":
            raise RuntimeError(
                f"CEPO_BUILD_CUDA=1 but torch does not import here ({exc}); "
                "install torch first and use pip install --no-build-isolation"
            ) from exc
        return False, f"torch does not import in the build environment ({type(exc).__name__})"
    if flag == "1":
        if torch.version.cuda is None:
            raise RuntimeError(f"CEPO_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("CEPO_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True, "CEPO_BUILD_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, f"CUDA torch {torch.version.cuda} and a toolkit at {cpp_extension.CUDA_HOME}"


def extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(): empty unless the extension is built."""
    build, why = cuda_build_decision()
    print(f"cepo: {'building' if build else 'not building'} the CUDA extension ({why})")
    if not build:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    csrc = ROOT / "csrc"
    sources = [str(p.relative_to(ROOT)) for p in sorted(csrc.glob("*.cu"))] + ["csrc/ops.cpp"]
    ext = CUDAExtension(
        name="cepo_kernels._C",
        sources=sources,
        include_dirs=[str(csrc)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


if __name__ == "__main__":  # setuptools' build backend and pip run this file as __main__
    setup(**extension_kwargs())
