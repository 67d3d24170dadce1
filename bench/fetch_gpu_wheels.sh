#!/usr/bin/env bash
# Fill .whl/ with every wheel that bench/gpu_check.sh needs on a lent GPU machine: the shared
# set (deepspeed, liger-kernel, cut-cross-entropy, math-verify, ...) plus what the trainer
# imports that the GPU image lacks, and TRL (its trl.kernels are benchmark peers; a 0.9 MB wheel) (its package list is in the device tool's KINDS.md).
# Run here, from the repo root, with the project's venv on PATH (deepspeed's wheel is built
# against the local torch):   PATH=$PWD/.venv/bin:$PATH bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/device/fetch-wheels.sh datasets dill multiprocess omegaconf "trl==1.16.0"
