#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels, build the CUDA extension just in
# time, run the GPU tests, then the benchmark harness (pytest-benchmark, bench/bench_<op>.py;
# peers: Liger, Cut Cross-Entropy, FlexAttention, TRL's trl.kernels) once per kernel
# configuration (--kernel-config v1: as shipped, v2: the restructured kernels) in the same call,
# compare them with --benchmark-compare, turn the JSON into bench/results/<card>.jsonl rows (GB/s,
# TFLOP/s against the card's ceilings) under $OUT, and print a table last.
# Budget: about 6 minutes on an H100/H200, under 10 at the worst (each step has its own limit);
# GPU_CHECK_CONFIGS="v2" runs one configuration only; GPU_CHECK_NO_CUDA=1 skips the CUDA build.
#
# Here, once:   PATH=$PWD/.venv/bin:$PATH bash bench/fetch_gpu_wheels.sh   (fills .whl/, git-ignored)
# Device call:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Dry run here: GPU_CHECK_DRY=1 OUT=/tmp/gpu_out bash bench/gpu_check.sh
#
# Every step has its own time limit and a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cepo_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/gpu_check.log"
: >"$log"
: >"$OUT/steps.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$log" | sed 's/^/   /'
}

if [ -z "${GPU_CHECK_DRY:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  # the wheels are for the device's Python 3.12; a CPU dry run uses the local venv instead
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed" | tee -a "$log"
else
  export PYTHONPATH=$PWD
  [ -n "${GPU_CHECK_DRY:-}" ] || echo "no .whl/ carried: peers (liger, cut-cross-entropy) and deepspeed may be missing" | tee -a "$log"
fi
PY=${PY:-python3}
CONFIGS=${GPU_CHECK_CONFIGS:-"v1 v2"}
# pytest-benchmark wants its storage under the working directory: a scratch folder in the checkout,
# moved to $OUT/benchmarks afterwards
STORAGE="$PWD/.gpu_check_benchmarks"
BENCH_ARGS=(-q -p no:cacheprovider --benchmark-only --benchmark-save-data --benchmark-columns=median,iqr,rounds
            --benchmark-storage="file://$STORAGE")

bench_configs() {  # bench_configs SECONDS_PER_CONFIG EXTRA_PYTEST_ARGS...
  local limit=$1; shift
  local cmp=()
  rm -rf "$STORAGE" "$OUT/benchmarks"
  for cfg in $CONFIGS; do
    # the first configuration is saved as run 0001; every later one is compared against it
    step "bench_$cfg" "$limit" "$PY" -m pytest bench "${BENCH_ARGS[@]}" --kernel-config "$cfg" \
      --benchmark-save="$cfg" --benchmark-json="$OUT/bench_$cfg.json" "${cmp[@]}" "$@"
    cmp=(--benchmark-compare=0001)
  done
  mv "$STORAGE" "$OUT/benchmarks" 2>/dev/null
  # side by side: every case under each configuration, grouped per case
  step compare 20 "$PY" -m pytest_benchmark compare "$OUT"/bench_*.json --group-by=group --columns=median,iqr \
    --sort=name --csv="$OUT/compare"
  # --write-order: the measured backend order per op on this card, for review; auto follows each
  # op's ORDER in code (no file is read at dispatch), changed by hand when a measurement says so
  step results 20 "$PY" -m bench.results_jsonl "$OUT"/bench_*.json --out "$OUT/results" \
    --write-order "$OUT/measured_order.json"
}

if [ -n "${GPU_CHECK_DRY:-}" ]; then
  # Dry run on a CPU machine: the same steps on tiny shapes; Triton through the interpreter is
  # checked, not timed.
  export TRITON_INTERPRET=1
  step info 60 "$PY" -m cepo_kernels.info
  # (the bench suite's own test is left out: bench_configs below runs the same cases)
  step tests 1800 "$PY" -m pytest -q -x tests/kernels -p no:cacheprovider -k "not bench_suite"
  bench_configs 600 --bench-size tiny
  exit 0
fi

export CEPO_CUDA_JIT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # build csrc/ on first use
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# limits: 150 + 20 + 120 + 2 x 130 + 2 x 20 = 590 s at the very worst; typically about 6 minutes
[ -n "${GPU_CHECK_NO_CUDA:-}" ] || step cuda_build 150 "$PY" -c "from cepo_kernels.cuda import jit; jit.load(verbose=True)"
step info 20 "$PY" -m cepo_kernels.info
# the numeric GPU tests (compiled kernels against float64; v1 and v2 both in test_kernel_configs;
# torch.compile of the triton and cuda backends as the first call of a process)
step tests 120 bash -c "'$PY' -m pytest -q -p no:cacheprovider -m 'gpu or cuda_ext' tests/kernels; \
  '$PY' -m pytest -q -p no:cacheprovider tests/kernels/test_kernel_configs.py"
bench_configs 130
# The trainer step (Qwen3-1.7B shape, ZeRO-2 bf16) is a separate run: GPU_CHECK_TRAINER=1.
[ -n "${GPU_CHECK_TRAINER:-}" ] && step bench_trainer 240 "$PY" -m bench.bench_trainer_step --out "$OUT"
echo "=== summary"
cat "$OUT/steps.txt"
"$PY" -m bench.results_jsonl "$OUT"/bench_*.json --no-write 2>/dev/null | tail -n 60
