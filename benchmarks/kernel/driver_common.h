// What the standalone kernel drivers (gemm_small_m_driver.cu,
// quantize_driver.cu) share; each includes it after the kernel source it tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "../../csrc/cpu/common.h"  // the CPU handlers' exact host bf16/f16 conversions

namespace jaxfp4 {
// The drivers run without the nanobind module: the last kernel is kept for their own reports.
const char* g_last_kernel = "";
void record_kernel(const char*, const char* kernel) { g_last_kernel = kernel; }
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

// A well-mixed 64-bit hash of element i and a seed (splitmix64's finaliser
// steps): the drivers' fill kernels derive their pseudo-random inputs from it.
__host__ __device__ inline uint64_t mix_hash(size_t i, uint64_t seed) {
  uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return h;
}
