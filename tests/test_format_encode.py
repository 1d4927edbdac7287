"""format.h's e2m1_encode_fast (the CUDA quantize kernel's per-element E2M1
rounding) gives e2m1_encode's code for EVERY float32 bit pattern: an
exhaustive host comparison over all 2^32 of them (about 15 s on one core).
The device build of the same function is checked the same way by
benchmarks/kernel/quantize_driver.cu's `check` mode. Skipped without a C++
compiler."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("clang++")

PROGRAM = r"""
#include <cstdio>
#include "jaxfp4/format.h"
int main() {
  unsigned long long bad = 0;
  uint32_t first = 0, u = 0;
  do {
    const float v = jaxfp4::bits_to_float(u);
    if (jaxfp4::e2m1_encode_fast(v) != jaxfp4::e2m1_encode(v) && bad++ == 0) first = u;
  } while (++u != 0);
  printf("%llu mismatches (first at bits 0x%08x)\n", bad, first);
  return 0;
}
"""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_e2m1_encode_fast_matches_every_float(tmp_path):
    src, exe = tmp_path / "encode.cc", tmp_path / "encode"
    src.write_text(PROGRAM)
    subprocess.run([CXX, "-std=c++17", "-O2", "-I", str(ROOT / "csrc/include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=120)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=300).stdout
    assert out.startswith("0 mismatches"), out
