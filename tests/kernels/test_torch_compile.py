"""``torch.compile(fullgraph=True)`` of a function calling the public ops works as the first call
of a process: each case runs in a fresh Python process (bodies in ``compile_cases.py``), so no
earlier eager call or test can have filled a cache the trace depends on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_fresh(call: str, timeout: int = 600) -> None:
    """Run ``tests.kernels.compile_cases.<call>`` in a new interpreter; fail with its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    code = f"from tests.kernels import compile_cases as c; c.{call}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), (
        f"{call}: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
def test_compile_fullgraph_first_call_of_process(op):
    run_fresh(f"{op}_first_call()")


def test_compile_fullgraph_every_public_op_first_call():
    run_fresh("public_ops_first_call()")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
def test_compile_fullgraph_triton_backend_first_call_on_gpu(op):
    run_fresh(f"{op}_first_call(backend='triton')")


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_compile_cuda_backend_first_call():
    run_fresh("cuda_token_logprobs_first_call()")
