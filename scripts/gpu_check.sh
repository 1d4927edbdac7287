#!/usr/bin/env bash
# Everything a GPU change must pass, in one go, on a machine with an NVIDIA GPU
# and the toolchain already installed (the project's device machine): build,
# the whole test suite, compute-sanitizer memcheck + racecheck on the GPU
# tests, the example, and the GEMM benchmark. Logs go to ${OUT:-.out}/.
#   bash scripts/gpu_check.sh [--quick-bench|--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ==="; }

step build
$PY -m pip install -q --no-build-isolation --no-deps -e . \
  -Ccmake.define.JAXFP4_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import jax, jaxfp4; print(jax.devices()); print(jaxfp4.backend_info())"

step tests
$PY -m pytest -q -ra tests 2>&1 | tee "$OUT/pytest.log" | tail -15

step "compute-sanitizer memcheck (GPU tests)"
compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x -m gpu tests \
  -k "not sweep" 2>&1 | tee "$OUT/memcheck.log" | grep -E "ERROR SUMMARY|passed|failed" | tail -3
step "compute-sanitizer racecheck (GPU tests)"
compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m pytest -q -x -m gpu tests \
  -k "not sweep" 2>&1 | tee "$OUT/racecheck.log" | grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" | tail -3

step example
$PY examples/quickstart.py 2>&1 | tee "$OUT/quickstart.log"

case "${1:-}" in
  --no-bench) ;;
  --quick-bench) step benchmark; $PY benchmarks/gemm.py --quick 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
  *) step benchmark; $PY benchmarks/gemm.py 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
esac
