"""The standalone kernel drivers (benchmarks/kernel/*_driver.cu) still build.

They include the CUDA sources directly and call internal names (the FFI
handlers' Impl functions, the launch helpers), so a refactor of csrc/ can
break them without breaking the extension; the device machine runs them under
compute-sanitizer (scripts/gpu_check.sh). Compile-only: no GPU needed, skipped
where nvcc is not installed."""

import shutil
import subprocess
from pathlib import Path

import jax.ffi
import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = ["gemm_small_m_driver.cu", "quantize_driver.cu"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_drivers_compile(tmp_path):
    procs = {}
    for name in DRIVERS:  # both at once: each takes tens of seconds
        cmd = ["nvcc", "-std=c++17", "-O1", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
               "-I", str(ROOT / "csrc/include"), "-I", jax.ffi.include_dir(),
               str(ROOT / "benchmarks/kernel" / name), "-o", str(tmp_path / name.removesuffix(".cu"))]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name} does not build:\n{out[-4000:]}"
        assert (tmp_path / name.removesuffix(".cu")).exists()
