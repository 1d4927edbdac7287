#!/usr/bin/env bash
# Everything a GPU change must pass, in one go, on a machine with an NVIDIA GPU
# and the toolchain already installed (the project's device machine): build,
# the whole test suite on the GPU, the decode example, the quick GEMM benchmark, and
# compute-sanitizer memcheck/racecheck over the GPU tests. Each step has a time
# limit so that one slow step cannot eat the others. Logs go to ${OUT:-.out}/.
#   bash scripts/gpu_check.sh [--full-bench|--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T)) ==="; }

step build
$PY -m pip install -q --no-build-isolation --no-deps -e . \
  -Ccmake.define.JAXFP4_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" 2>&1 | tail -3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import jax, jaxfp4; print(jax.devices()); print(jaxfp4.backend_info())"

step "GPU tests"
timeout 300 $PY -m pytest -q -ra -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -8
step "ops, transforms, flax and checkpoint tests with the GPU as default device (the CUDA paths)"
timeout 240 $PY -m pytest -q -ra -p no:cacheprovider tests/test_ops.py tests/test_transforms.py tests/test_flax.py tests/test_dot_general.py tests/test_checkpoint.py tests/test_decode_example.py \
  2>&1 | tee "$OUT/pytest_ops.log" | tail -8

step "example: decode (Llama-3.1-8B shapes)"
timeout 240 $PY examples/decode.py --plot "$OUT/decode.png" 2>&1 | grep -v "run/s" | tee "$OUT/decode.log" | tail -24

case "${1:-}" in
  --no-bench) ;;
  --full-bench) step benchmark; $PY benchmarks/gemm.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  *) step "benchmark (quick)"; timeout 300 $PY benchmarks/gemm.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
esac

step "compute-sanitizer memcheck (GPU tests, sweeps excluded)"
timeout 150 compute-sanitizer --tool memcheck $PY -m pytest -q -x -m gpu -p no:cacheprovider tests \
  -k "not every_m and not ragged_rows" 2>&1 | tee "$OUT/memcheck.log" | grep -E "ERROR SUMMARY|passed|failed" | tail -3
step "compute-sanitizer racecheck (GEMM kernels)"
timeout 100 compute-sanitizer --tool racecheck $PY -m pytest -q -x -m gpu -p no:cacheprovider tests/test_gpu_gemm.py \
  -k "w4a4 or shapes" 2>&1 | tee "$OUT/racecheck.log" | grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" | tail -3
