#!/usr/bin/env bash
# CUDA checks that need no GPU. Called from .ci/run after `pip install --no-build-isolation -e .`.
#   1. ptxas resource report of every kernel instantiation (sm_80, sm_90): fail on any register spill.
#   2. ThreadSanitizer and AddressSanitizer+UndefinedBehaviorSanitizer runs of the emulated kernels on tiny
#      shapes (tests/cuda_emulated/sanitize_main.cpp): fail on any report; TSan must flag a planted race.
#   3. The installed spinal_ops._C holds sm_80 and sm_90 machine code for the spinal kernels.
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (unused: one compile
# at a time on purpose, the machines have 2 cores). Artefacts go to build/cuda_checks/.
set -euo pipefail

PYTHON=${PYTHON:-python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC="$CUDA_HOME/bin/nvcc"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/build/cuda_checks"
SUPPORT="$ROOT/tests/cuda_emulated"
mkdir -p "$OUT"
cd "$ROOT"

step() { printf '\n== %s\n' "$*"; }

if [[ ! -x "$NVCC" ]]; then
  echo "cuda_checks: nvcc not found at $NVCC; nothing to check"
  exit 0
fi

# ------------------------------------------------------------------------------------ 1. ptxas report
step "ptxas resource report (sm_80, sm_90)"
REPORT="${SPINAL_OPS_PTXAS_REPORT:-}"
if [[ -z "$REPORT" || ! -s "$REPORT" ]]; then
  # Compile the CUDA binding (all kernel instantiations) the way setup.py does, keeping ptxas's report.
  REPORT="$OUT/ptxas_report.txt"
  read -r -a INCLUDES < <("$PYTHON" - <<'PY'
import glob, os, sysconfig
from torch.utils.cpp_extension import include_paths
dirs = include_paths(device_type="cuda") if "device_type" in include_paths.__code__.co_varnames else include_paths(cuda=True)
try:
    import nvidia
    for root in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
except ImportError:
    pass
dirs += [sysconfig.get_paths()["include"], "csrc"]
print(" ".join("-I" + d for d in dirs if os.path.isdir(d)))
PY
  )
  GENCODE=()
  IFS=';' read -r -a ARCHS <<< "${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  for a in "${ARCHS[@]}"; do
    a=${a//./}; a=${a%%+PTX}
    GENCODE+=("-gencode=arch=compute_$a,code=sm_$a")
  done
  start=$SECONDS
  "$NVCC" -c csrc/cuda/spinal_cuda.cu -o "$OUT/spinal_cuda.o" "${INCLUDES[@]}" \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    --compiler-options -fPIC -O3 -std=c++20 -lineinfo -Xptxas -v --expt-relaxed-constexpr "${GENCODE[@]}" \
    > "$REPORT" 2>&1 || { cat "$REPORT"; echo "cuda_checks: nvcc failed"; exit 1; }
  echo "compiled csrc/cuda/spinal_cuda.cu in $((SECONDS - start)) s; report: $REPORT"
fi
"$PYTHON" "$SUPPORT/ptxas_report.py" "$REPORT" --fail-on-spills > "$OUT/ptxas_summary.txt" || {
  grep -E "SPILLS|instantiations" "$OUT/ptxas_summary.txt"
  echo "cuda_checks: register spills (full table: $OUT/ptxas_summary.txt)"
  exit 1
}
tail -n 1 "$OUT/ptxas_summary.txt"

# ------------------------------------------------------------------------------------- 2. sanitizers
CXXFLAGS=(-std=c++20 -O1 -g -pthread -Wall -Wno-unknown-pragmas -I"$CUDA_HOME/include" -Icsrc -I"$SUPPORT")
DRIVER="$SUPPORT/sanitize_main.cpp"

step "AddressSanitizer + UndefinedBehaviorSanitizer (ucontext fibers)"
g++ "${CXXFLAGS[@]}" -DSIMT_FIBER_UCONTEXT -fsanitize=address,undefined -fno-sanitize-recover=all \
  "$DRIVER" -o "$OUT/sanitize_asan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$OUT/sanitize_asan" > "$OUT/asan.log" 2>&1 || { cat "$OUT/asan.log"; echo "cuda_checks: ASan/UBSan run failed"; exit 1; }
if grep -E "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$OUT/asan.log"; then
  echo "cuda_checks: ASan/UBSan reported errors (log: $OUT/asan.log)"; exit 1
fi
tail -n 1 "$OUT/asan.log"

step "ThreadSanitizer (one OS thread per CUDA thread)"
g++ "${CXXFLAGS[@]}" -DSIMT_OS_THREADS -fsanitize=thread "$DRIVER" -o "$OUT/sanitize_tsan"
TSAN_OPTIONS=halt_on_error=1 "$OUT/sanitize_tsan" > "$OUT/tsan.log" 2>&1 \
  || { cat "$OUT/tsan.log"; echo "cuda_checks: TSan run failed"; exit 1; }
if grep -q "WARNING: ThreadSanitizer" "$OUT/tsan.log"; then
  cat "$OUT/tsan.log"; echo "cuda_checks: ThreadSanitizer reported a race"; exit 1
fi
tail -n 1 "$OUT/tsan.log"
# Self-test: the same build must flag a planted lost update.
if TSAN_OPTIONS=halt_on_error=1 "$OUT/sanitize_tsan" --planted-race > "$OUT/tsan_planted.log" 2>&1 \
   || true; ! grep -q "WARNING: ThreadSanitizer: data race" "$OUT/tsan_planted.log"; then
  cat "$OUT/tsan_planted.log"; echo "cuda_checks: ThreadSanitizer missed the planted race"; exit 1
fi
echo "planted race flagged: $(grep -m1 'SUMMARY' "$OUT/tsan_planted.log")"

# --------------------------------------------------------------------------- 3. sm_80 / sm_90 code
step "machine code in the installed spinal_ops._C"
LIB=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('spinal_ops._C').origin)")
if command -v cuobjdump > /dev/null; then cuobjdump --list-elf "$LIB" || true; fi
"$PYTHON" "$SUPPORT/fatbin_archs.py" "$LIB" --require sm_80 sm_90 \
  --kernel spinal_fwd_kernel --kernel spinal_bwd_chain_kernel --kernel spinal_bwd_weights_kernel \
  --kernel spinal_bwd_reduce_kernel

echo
echo "cuda_checks: all passed"
