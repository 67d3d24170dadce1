"""Run every microbenchmark that can run here (``--quick`` for small CPU shapes).

``python -m bench.run_all [--quick] [--out DIR]``. GPU-only benchmarks say so and are skipped
on a CPU machine. Results are appended to ``bench/results/<machine>.jsonl``.
"""

from __future__ import annotations

import importlib
import sys
import time

import torch

# (module, runs on CPU): GPU-only modules are skipped without CUDA.
BENCHMARKS = [
    ("bench.bench_logprobs", True),
    ("bench.bench_linear_logprobs", True),
    ("bench.bench_cuda_logprobs", False),
    ("bench.bench_tree_attention", False),
    ("bench.bench_trainer_step", False),
]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    failures = 0
    for name, on_cpu in BENCHMARKS:
        if not torch.cuda.is_available() and not on_cpu:
            print(f"== {name}: skipped (needs a CUDA device)")
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            print(f"== {name}: not present ({exc})")
            continue
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            module.main(argv)
        except SystemExit as exc:  # a benchmark that declines to run here
            print(f"   exited: {exc}")
        except Exception as exc:
            failures += 1
            print(f"   FAILED: {type(exc).__name__}: {exc}")
        print(f"   ({time.time() - t0:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
