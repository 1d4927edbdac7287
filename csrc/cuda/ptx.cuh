// Small PTX wrappers the CUDA kernels share.
#pragma once

#include <cstdint>

namespace jaxfp4 {

// PTX prmt: byte n of the result is byte (sel >> 4n) & 7 of {b, a}; where bit 3
// of that nibble is set, it is 0xFF or 0x00 by the sign bit of that byte.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

}  // namespace jaxfp4
