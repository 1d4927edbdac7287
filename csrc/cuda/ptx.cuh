// Small PTX wrappers and bit conversions the CUDA kernels share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jaxfp4 {

// PTX prmt: byte n of the result is byte (sel >> 4n) & 7 of {b, a}; where bit 3
// of that nibble is set, it is 0xFF or 0x00 by the sign bit of that byte.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// The float32 value of a 16-bit float given by its bits (the low half of h), exactly.
template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t h);
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16_raw>(uint32_t h) {
  return __uint_as_float(h << 16);
}
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint32_t h) {
  return __uint_as_float(h << 16);
}
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

// The 8 values of a 16-byte load of 16-bit floats T, in order, as float32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = half_bits_to_float<T>(w[i] & 0xFFFFu);
    x[2 * i + 1] = half_bits_to_float<T>(w[i] >> 16);
  }
}

// Programmatic dependent launch (device.cuh's launch_dependent): waits until the
// kernels this grid depends on have completed and their writes are visible (a
// no-op in an ordinary launch).
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// Lets the next kernel on the stream, if launched as a programmatic dependent,
// be scheduled once every CTA of this grid has executed this or exited (it
// still waits for this grid's completion before using its results).
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

}  // namespace jaxfp4
