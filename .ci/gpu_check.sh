#!/usr/bin/env bash
# The prepared GPU check: one run on a machine with an NVIDIA GPU and no network proves the GPU backends.
#
#   bash .ci/gpu_check.sh            (results in $OUT when set, else build/gpu_check/)
#
# Steps, each with its own timeout and all within SPINAL_GPU_CHECK_BUDGET seconds (default 480), most valuable
# first (the budget cuts from the end):
#   env           device, driver, versions
#   build         pip install --no-build-isolation --no-deps --no-index -e . for the local architecture only
#                 (TORCH_CUDA_ARCH_LIST from the device; sm_90 without one), keeping ptxas's report
#   tests-cuda    tests/test_cuda_gpu.py and the GPU double-backward tests: every CUDA kernel path
#                 (tests/kernel_paths.py), the gemm backend on cuBLAS, the GPU backends through the module API,
#                 sync-free calls, CUDA graph capture, streams, a second device, repeatability, opcheck,
#                 torch.compile
#   sanitize-*    compute-sanitizer memcheck, racecheck (then synccheck, initcheck) on .ci/gpu_driver.py
#   bench-*       python -m spinal_ops bench --device cuda in bfloat16 (then float32) on a subset (3 heads,
#                 B = 1, 1024, 65536, forward and fwd+bwd): fused cuda, triton and gemm, eager, compiled, dense,
#                 CUDA-event timing
#   tests-triton  tests/test_triton.py on the GPU
# Without a GPU: the build, the emulated CUDA tests, and the GPU bench command, which must refuse in one line.
# Without a GPU the GPU-only steps say so and are skipped; the others run the same commands; exit status 0.
# With a GPU the exit status is that of the first failed step (every step still runs).
# Files written (at most 8, flat, for the device machine's return limits): summary.txt, gpu_check.log (every
# step's output), ptxas.txt, tests.xml, bench-bfloat16.json, bench-bfloat16.md, bench-float32.json,
# bench-float32.md.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEST=${OUT:-$ROOT/build/gpu_check}
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
SUMMARY="$DEST/summary.txt"
: > "$LOG"
: > "$SUMMARY"
PYTHON=${PYTHON:-python3}
BUDGET=${SPINAL_GPU_CHECK_BUDGET:-480}
START=$SECONDS
STATUS=0
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the Triton kernels run on the GPU here

say() { printf '%s\n' "$*" | tee -a "$SUMMARY" "$LOG"; }

# run_step NAME TIMEOUT COMMAND...: runs within the remaining budget, output to the log, status to the summary.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 10)); then
    say "[$name] skipped: the ${BUDGET} s budget is spent"
    return 0
  fi
  ((limit > left)) && limit=$left
  printf '\n===== %s (timeout %d s): %s\n' "$name" "$limit" "$*" >> "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    say "[$name] ok (${took} s)"
  else
    ((rc == 124)) && say "[$name] TIMED OUT after ${took} s" || say "[$name] FAILED with status $rc (${took} s)"
    ((STATUS == 0)) && STATUS=$rc
  fi
  return 0
}

ARCH=$("$PYTHON" - <<'PY' 2>/dev/null
import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability(0)
    print(f"{major}.{minor}")
PY
)
if [[ -n "$ARCH" ]]; then
  GPU=1
  say "GPU found: compute capability $ARCH"
else
  GPU=0
  ARCH=9.0
  say "no GPU found: running what a CPU can (the sm_90 build without a device, the emulated CUDA tests); GPU steps skipped"
fi

envinfo() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)'
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not installed"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null | tail -n 2 || echo "nvcc: not found"
  compute-sanitizer --version 2>/dev/null | head -n 2 || echo "compute-sanitizer: not found"
}
envinfo | tee -a "$SUMMARY" >> "$LOG"

run_step build 330 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . -v
# nvcc runs with -Xptxas -v: its resource report (registers, shared memory, spills) is in the build's output
grep -E "ptxas (info|warning|error)|bytes spill" "$LOG" > "$DEST/ptxas.txt" || true
say "[ptxas] $(grep -c 'Compiling entry function' "$DEST/ptxas.txt") kernel compilations, $(grep -E '[1-9][0-9]* bytes spill' "$DEST/ptxas.txt" | wc -l) with spills"

bench() {
  local dtype=$1 tmp
  tmp=$(mktemp -d)
  # the subset that fits the budget (every cell compiles torch.compile's provider afresh): a narrow, a wide and a
  # many-layer head, inference and training, batch 1 / 1024 / 65536
  "$PYTHON" -m spinal_ops bench --device cuda --dtype "$dtype" --configs resnet-head wide-resnet-head vit-custom \
    --batch-sizes 1 1024 65536 --modes forward fwd+bwd --min-run-time 0.05 --out "$tmp" || return $?
  cp "$tmp/latest/bench.json" "$DEST/bench-$dtype.json" && cp "$tmp/latest/bench.md" "$DEST/bench-$dtype.md"
}
sanitize() {
  if ! command -v compute-sanitizer > /dev/null; then
    say "[sanitize-$1] skipped: compute-sanitizer not found"
    return 0
  fi
  run_step "sanitize-$1" 90 compute-sanitizer --tool "$1" --error-exitcode 9 "$PYTHON" .ci/gpu_driver.py
}

# The GPU cost model's rows for the benchmark subset below, beside the measurement (the model needs no GPU).
run_step gpu-model 60 bash -c "'$PYTHON' -m spinal_ops gpu-model --configs resnet-head wide-resnet-head vit-custom \
  --batch-sizes 1 1024 65536 > '$DEST/gpu-model.txt'"

if ((GPU)); then
  # Most valuable first: what the budget cuts is what matters least. Triton tiles fixed (no autotuning): one
  # compile per kernel variant.
  export SPINAL_OPS_TRITON_AUTOTUNE=0
  run_step tests-cuda 180 "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$DEST/tests.xml" \
    tests/test_cuda_gpu.py tests/test_double_backward.py -m cuda
  sanitize memcheck
  sanitize racecheck
  run_step bench-bfloat16 150 bash -c "$(declare -f bench); PYTHON='$PYTHON' DEST='$DEST' bench bfloat16"
  run_step tests-triton 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton.py -m "cuda or triton"
  run_step bench-float32 150 bash -c "$(declare -f bench); PYTHON='$PYTHON' DEST='$DEST' bench float32"
  sanitize synccheck
  sanitize initcheck
else
  run_step tests-emulated 600 "$PYTHON" -m pytest -q -m emulated -p no:cacheprovider --junitxml="$DEST/tests.xml" \
    tests
  say "[sanitize] skipped: no GPU"
  # the GPU command itself: without a GPU it must stop with one clear line
  if "$PYTHON" -m spinal_ops bench --device cuda --dtype bfloat16 >> "$LOG" 2>&1; then
    say "[bench] FAILED: --device cuda without a GPU did not refuse"
    STATUS=1
  else
    say "[bench] skipped: no GPU ($(tail -n 1 "$LOG"))"
  fi
fi

say "done in $((SECONDS - START)) s; results in $DEST"
exit "$STATUS"
