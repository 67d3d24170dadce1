"""The benchmark harness (pytest-benchmark, ``bench/bench_<op>.py``) collects and its correctness
checks pass on tiny CPU shapes (timing disabled: ``--benchmark-disable`` runs each benchmarked call
once)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_suite_runs_on_tiny_shapes(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-x", "-p", "no:cacheprovider", "--benchmark-disable",
         "--bench-size", "tiny", "-k", "not triton", f"--benchmark-storage=file://{tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
