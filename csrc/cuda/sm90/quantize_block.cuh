// One NVFP4 scale block (16 inputs) quantized on the GPU: the loads, the
// NaN-propagating max, the E4M3 scale conversions and the code packing that
// the quantize kernel runs per block (quantize_kernels.cuh) and that the
// small-M GEMM runs when it quantizes its activations itself
// (gemm_small_m_packed.cuh). Every shortcut equals format.h's definition
// (checked over all inputs by benchmarks/kernel/quantize_driver.cu `check`).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../ptx.cuh"
#include "jaxfp4/format.h"

namespace jaxfp4 {
namespace quantize_block {

// ---- one scale block of 16 inputs, kept as the raw 32-bit words loaded ----

// The sign bits of 8 elements in their code positions (bit 4i + 3), from
// `even` and `odd`: byte j of each is 0xFF where element 2j (2j + 1) is negative.
__device__ __forceinline__ uint32_t sign_bits8(uint32_t even, uint32_t odd) {
  return (even & 0x08080808u) | (odd & 0x80808080u);
}

// 16-bit inputs: 8 words, element 2k in the low half of word k.
template <typename T>
struct Block16 {
  uint32_t w[8];

  __device__ __forceinline__ void load(const void* x, uint32_t b) {
    const uint4* p = static_cast<const uint4*>(x) + 2 * static_cast<size_t>(b);
    const uint4 a = __ldg(p), c = __ldg(p + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = c.x; w[5] = c.y; w[6] = c.z; w[7] = c.w;
  }

  __device__ __forceinline__ float value(int i) const {
    return half_bits_to_float<T>(i & 1 ? w[i / 2] >> 16 : w[i / 2] & 0xFFFFu);
  }

  // max |x| of the 16, NaN if any is NaN: HMNMX2.NAN on sign-cleared pairs.
  // The two halves left are non-negative, so they compare as integers (NaN
  // above Inf above every finite value), and the winner converts exactly.
  __device__ __forceinline__ float abs_max() const {
    using V2 = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
    V2 m[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t a = w[k] & 0x7FFF7FFFu;
      m[k] = *reinterpret_cast<const V2*>(&a);
    }
#pragma unroll
    for (int s = 4; s > 0; s >>= 1)
#pragma unroll
      for (int k = 0; k < s; ++k) m[k] = __hmax2_nan(m[k], m[k + s]);
    const uint32_t pair = *reinterpret_cast<const uint32_t*>(&m[0]);
    return half_bits_to_float<T>(max(pair & 0xFFFFu, pair >> 16));
  }

  // Signs of elements first .. first+7 (first = 0 or 8) at bits 4i + 3: the
  // sign bytes (1 and 3) of words first/2 .. first/2 + 3, gathered and
  // sign-replicated.
  __device__ __forceinline__ uint32_t signs8(int first) const {
    const uint32_t* v = w + first / 2;
    const uint32_t a = prmt(v[0], v[1], 0x7531u), b = prmt(v[2], v[3], 0x7531u);
    return sign_bits8(prmt(a, b, 0xECA8u), prmt(a, b, 0xFDB9u));
  }
};

// float32 inputs: 16 words.
struct BlockF32 {
  uint32_t w[16];

  __device__ __forceinline__ void load(const void* x, uint32_t b) {
    const uint4* p = static_cast<const uint4*>(x) + 4 * static_cast<size_t>(b);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint4 a = __ldg(p + k);
      w[4 * k] = a.x; w[4 * k + 1] = a.y; w[4 * k + 2] = a.z; w[4 * k + 3] = a.w;
    }
  }

  __device__ __forceinline__ float value(int i) const { return __uint_as_float(w[i]); }

  // Signs of elements first .. first+7 at bits 4i + 3: the top bytes of the
  // even and of the odd elements, gathered and sign-replicated.
  __device__ __forceinline__ uint32_t signs8(int first) const {
    const uint32_t* v = w + first;
    const uint32_t e = prmt(prmt(v[0], v[2], 0x73u), prmt(v[4], v[6], 0x73u), 0xDC98u);
    const uint32_t o = prmt(prmt(v[1], v[3], 0x73u), prmt(v[5], v[7], 0x73u), 0xDC98u);
    return sign_bits8(e, o);
  }

  // max |x| of the 16, NaN if any is NaN (PTX max.NaN: FMNMX.NAN).
  __device__ __forceinline__ float abs_max() const {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) asm("max.NaN.f32 %0, %0, %1;" : "+f"(m) : "f"(fabsf(value(i))));
    return m;
  }
};

template <typename T>
struct BlockOf { using type = Block16<T>; };
template <>
struct BlockOf<float> { using type = BlockF32; };

// ---- scale arithmetic on the hardware conversions (checked exhaustively
// against format.h by benchmarks/kernel/quantize_driver.cu `check`) ----------

// == e4m3_encode_satfinite(v) for every float v.
__device__ __forceinline__ uint32_t e4m3_encode_hw(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// == e4m3_decode(b) for every byte b that is not NaN (0x7F, 0xFF give a NaN too).
__device__ __forceinline__ float e4m3_decode_hw(uint32_t b) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3)));
}

// Codes of 8 elements (first .. first+7) of a block whose products x * os are
// never NaN and keep the sign of x (os in [+0, FLT_MAX]), packed 4 bits each.
// e2m1_magnitude_float's results are 0x4B000004 + code: shifted into place and
// summed, the 0x4B000004s add up to a constant (mod 2^32) that the start value
// cancels; the codes occupy disjoint nibbles, so the sum carries nothing. The
// sign bits come from the inputs.
constexpr uint32_t magnitude_pack_bias() {
  uint32_t sum = 0;
  for (int i = 0; i < 8; ++i) sum += 0x4B000004u << (4 * i);  // the bits of kE2M1Magic
  return 0u - sum;
}

template <typename B>
__device__ __forceinline__ uint32_t pack8_fast(const B& blk, int first, float os) {
  uint32_t word = magnitude_pack_bias();
#pragma unroll
  for (int i = 0; i < 8; ++i) word += float_to_bits(e2m1_magnitude_float(__fmul_rn(blk.value(first + i), os))) << (4 * i);
  return word | blk.signs8(first);
}

// The same codes for any block, by the spec's own e2m1_encode.
template <typename B>
__device__ __forceinline__ uint2 pack16_exact(const B& blk, float os) {
  uint32_t word[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 16; ++i) word[i / 8] |= e2m1_encode(__fmul_rn(blk.value(i), os)) << (4 * (i % 8));
  return make_uint2(word[0], word[1]);
}

// ---- one block, in format.h's order (block_scale, block_output_scale, the codes) ----

// block_scale(vmax, gs) on the hardware conversion.
__device__ __forceinline__ uint32_t block_scale_hw(float vmax, float gs) {
  return e4m3_encode_hw(gs * (vmax * recip6()));
}

// block_output_scale(sf, gs) on the hardware decode, with inv_gs = 1 / gs.
__device__ __forceinline__ float block_output_scale_hw(uint32_t sf, float inv_gs) {
  return sf == 0 ? 0.0f : __frcp_rn(e4m3_decode_hw(sf) * inv_gs);
}

// The 16 codes of a block (max |x| vmax, output scale os), plain nibble order:
// pack8_fast where both are finite, else the spec's e2m1_encode.
template <typename B>
__device__ __forceinline__ uint2 encode16(const B& blk, float vmax, float os) {
  const bool finite = max(float_to_bits(vmax), float_to_bits(os)) < 0x7F800000u;  // both in [+0, FLT_MAX]
  return finite ? make_uint2(pack8_fast(blk, 0, os), pack8_fast(blk, 8, os)) : pack16_exact(blk, os);
}

}  // namespace quantize_block
}  // namespace jaxfp4
