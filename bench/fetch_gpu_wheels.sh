#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that bench/gpu_check.sh installs offline on a GPU machine
# whose image has torch, triton, transformers, peft, accelerate and pytest but not the rest of what
# the trainer and the benchmark peers import. Wheels are for CPython 3.12 on x86_64 Linux (override
# with GPU_PYTHON=3.11 ...). deepspeed ships only a source archive: it is built here into a py3
# wheel without its C++ ops (it compiles those it needs on first use, with the GPU machine's nvcc).
# Run from the repo root with the project's venv on PATH (deepspeed's build imports torch):
#   PATH=$PWD/.venv/bin:$PATH bash bench/fetch_gpu_wheels.sh [extra packages...]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
py=${GPU_PYTHON:-3.12}
plat=(--python-version "$py" --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d .whl \
  hjson pydantic pydantic-core annotated-types typing-inspection \
  math-verify latex2sympy2-extended "antlr4-python3-runtime==4.13.2" \
  liger-kernel cut-cross-entropy datasets dill multiprocess omegaconf "trl==1.16.0" "$@"
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  python3 -c 'import torch' 2>/dev/null || { echo "fetch_gpu_wheels: needs torch here (deepspeed's build imports it)" >&2; exit 1; }
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: deepspeed -d "$tmp"
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "$tmp"/deepspeed-*.tar.gz -w .whl
  rm -rf "$tmp"
fi
# the offline install takes one version of each package
dups=$(ls .whl | sed -E 's/-[0-9].*//' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "fetch_gpu_wheels: several versions in .whl of: $dups (keep one)" >&2
  exit 1
fi
du -sh .whl
