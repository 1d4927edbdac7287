// What the standalone kernel drivers (gemm_small_m_driver.cu,
// quantize_driver.cu) share; each includes it after the kernel source it tests.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "../../csrc/cpu/common.h"  // the CPU handlers' exact host bf16/f16 conversions

namespace jaxfp4 {
// The drivers run without the nanobind module: nothing to report kernels to.
void record_kernel(const char*, const char*) {}
}  // namespace jaxfp4

using jaxfp4::cpu::bf16_to_float;
using jaxfp4::cpu::f16_to_float;
using jaxfp4::cpu::float_to_bf16;
using jaxfp4::cpu::float_to_f16;

// Aborts the driver on a failed CUDA call, naming it.
#define CK(x)                                                                                   \
  do {                                                                                          \
    cudaError_t e_ = (x);                                                                       \
    if (e_ != cudaSuccess) {                                                                    \
      fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      exit(1);                                                                                  \
    }                                                                                           \
  } while (0)
