#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels, build the CUDA extension
# just in time, run the GPU tests and every benchmark, write results under $OUT, and print
# a short table last. Budget: about 5 minutes on an H100/H200 (each step has its own limit,
# 11 minutes at the very worst); GPU_CHECK_TRAINER=1 adds the trainer step (up to 4 minutes).
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

if [ -n "${GPU_CHECK_DRY:-}" ]; then
  # Dry run on a CPU machine: the same steps on tiny shapes through the interpreter.
  export TRITON_INTERPRET=1
  step info 60 python3 -m cepo_kernels.info
  step tests 600 python3 -m pytest -q -x tests/kernels -p no:cacheprovider
  step bench 600 python3 -m bench.run_all --quick --out "$OUT"
  exit 0
fi

export CEPO_CUDA_JIT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # build csrc/ on first use
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
step cuda_build 180 python3 -c "from cepo_kernels.cuda import jit; jit.load(verbose=True)"
step info 60 python3 -m cepo_kernels.info
step tests 180 python3 -m pytest -q tests/kernels -p no:cacheprovider
step bench_logprobs 60 python3 -m bench.bench_logprobs --out "$OUT"
step bench_cuda 60 python3 -m bench.bench_cuda_logprobs --out "$OUT"
step bench_linear 90 python3 -m bench.bench_linear_logprobs --out "$OUT"
step bench_tree 120 python3 -m bench.bench_tree_attention --out "$OUT"
# The trainer step (Qwen3-1.7B shape, ZeRO-2 bf16) is a separate run: GPU_CHECK_TRAINER=1.
[ -n "${GPU_CHECK_TRAINER:-}" ] && step bench_trainer 240 python3 -m bench.bench_trainer_step --out "$OUT"
echo "=== summary"
cat "$OUT/steps.txt"
python3 - "$OUT" <<'PY'
import glob, json, sys
rows = [json.loads(l) for f in glob.glob(sys.argv[1] + "/*.jsonl") for l in open(f)]
for r in rows:
    print(f"{r.get('case', '?'):28s} {r.get('impl', '?'):10s} {r.get('median_ms', float('nan')):9.3f} ms  "
          f"{(r.get('frac_of_copy_bw') or 0):5.2f} of copy bw  peak {r.get('peak_extra_GB') or 0:.2f} GB")
PY
