#!/usr/bin/env bash
# Everything a GPU change must pass, in one go, on a machine with an NVIDIA GPU
# and the toolchain already installed (the project's device machine): build,
# the whole test suite on the GPU (pytest-xdist when installed), the decode
# example, the quick GEMM benchmark, and compute-sanitizer memcheck/racecheck
# over the two kernel drivers (benchmarks/kernel/*_driver.cu: the CUDA handlers
# called as XLA calls them, every output checked against the reference). The
# sanitizers run on the drivers, not on pytest: under compute-sanitizer a JAX
# process made no progress in 5 minutes on the device machine (H200, CUDA 13),
# with or without CUDA graphs and kernel filters. Each step has a time limit
# so that one slow step cannot eat the others. Logs go to ${OUT:-.out}/.
#   bash scripts/gpu_check.sh [--full-bench|--no-bench]   (a prebuilt jaxfp4/_jaxfp4*.so skips the build)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.out}; mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T)) ==="; }

step build
# A prebuilt extension in jaxfp4/ (built elsewhere against the oldest supported
# jaxlib and copied in) is used as it is: on the project's device machine
# (2026-11) `pip install --no-build-isolation` failed with "Cannot import
# 'scikit_build_core.build'", while a carried .so with PYTHONPATH worked.
if ls jaxfp4/_jaxfp4*.so >/dev/null 2>&1; then
  echo "using the prebuilt $(ls jaxfp4/_jaxfp4*.so)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  $PY -m pip install -q --no-build-isolation --no-deps -e . \
    -Ccmake.define.JAXFP4_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" 2>&1 | tail -3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import jax, jaxfp4; print(jax.devices()); print(jaxfp4.backend_info())"

# Parallel test workers when pytest-xdist is there (the GPU suite: ~70 s with 8, ~190 s without).
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
step "GPU tests"
timeout 300 $PY -m pytest -q -ra -p no:cacheprovider $XDIST -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -8
step "ops, transforms, flax and checkpoint tests with the GPU as default device (the CUDA paths)"
timeout 240 $PY -m pytest -q -ra -p no:cacheprovider $XDIST tests/test_ops.py tests/test_transforms.py tests/test_flax.py tests/test_dot_general.py tests/test_checkpoint.py tests/test_decode_example.py \
  2>&1 | tee "$OUT/pytest_ops.log" | tail -8

step "example: decode (Llama-3.1-8B shapes)"
timeout 240 $PY examples/decode.py --plot "$OUT/decode.png" 2>&1 | grep -v "run/s" | tee "$OUT/decode.log" | tail -24

case "${1:-}" in
  --no-bench) ;;
  --full-bench) step benchmark; $PY benchmarks/gemm.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
  *) step "benchmark (quick)"; timeout 300 $PY benchmarks/gemm.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
esac

step "kernel drivers: build"
FFI_INC=$($PY -c 'import jax.ffi as f; print(f.include_dir())')
for d in gemm_small_m quantize; do
  nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc/include -I "$FFI_INC" \
    "benchmarks/kernel/${d}_driver.cu" -o "$OUT/${d}_driver" 2>&1 | grep -E " error|error:" | head -5
done
step "kernel drivers: check, compute-sanitizer memcheck and racecheck"
for d in gemm_small_m quantize; do
  timeout 120 "$OUT/${d}_driver" check 2>&1 | grep -E "FAIL|check:" | tail -3
  timeout 180 compute-sanitizer --tool memcheck "$OUT/${d}_driver" check 2>&1 | grep -E "check:|ERROR SUMMARY" | tail -2
  timeout 120 compute-sanitizer --tool racecheck "$OUT/${d}_driver" check quick 2>&1 | grep -E "check:|RACECHECK SUMMARY" | tail -2
done
