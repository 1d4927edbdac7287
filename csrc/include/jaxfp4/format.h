// NVFP4 format arithmetic: the single C++ source of truth for the CPU handlers
// and the CUDA kernels. Every function here implements a rule of
// shared nvfp4-spec.md (sections cited inline) and is __host__ __device__ so
// both sides compute the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define JAXFP4_HD __host__ __device__ __forceinline__
#else
#define JAXFP4_HD inline
#endif

namespace jaxfp4 {

// Scale-factor layouts (spec section 3). The integer values are the `sf_layout`
// attribute of every FFI target; jaxfp4/format.py mirrors them.
enum class SfLayout : int32_t { kLinear = 0, kSwizzled128x4 = 1, kSwizzled8x4 = 2 };

constexpr int kBlock = 16;             // elements per scale block
constexpr float kE4M3Max = 448.0f;     // largest finite float8_e4m3fn
constexpr uint8_t kE4M3NaN = 0x7F;     // the NaN code the spec writes
constexpr uint32_t kRecip6Bits = 0x3E2AAAABu;  // float32 nearest to 1/6

JAXFP4_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

JAXFP4_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

JAXFP4_HD float recip6() { return bits_to_float(kRecip6Bits); }

// ---- E2M1 (spec section 1) -------------------------------------------------

// Decoded magnitude of a 3-bit E2M1 code: 0, .5, 1, 1.5, 2, 3, 4, 6.
JAXFP4_HD float e2m1_magnitude(uint32_t code3) {
  // exponent e = code>>1, mantissa m = code&1: subnormal (e=0) is m*0.5,
  // normal is 2^(e-1) * (1 + m/2).
  const uint32_t e = (code3 >> 1) & 3u, m = code3 & 1u;
  return e == 0 ? 0.5f * static_cast<float>(m)
                : static_cast<float>(1u << (e - 1)) * (1.0f + 0.5f * static_cast<float>(m));
}

JAXFP4_HD float e2m1_decode(uint32_t code4) {
  const float v = e2m1_magnitude(code4 & 7u);
  return (code4 & 8u) ? -v : v;
}

// Round-to-nearest-even on |v| then saturate at 6; the sign bit is kept (so
// -0.1 gives 0x8); NaN gives 0x7. The comparisons are the midpoints between
// neighbouring codes: strict where the lower code is even-mantissa... i.e. a
// tie goes to the code whose mantissa bit is 0 (0.25->0, 0.75->1, 1.25->1,
// 1.75->2, 2.5->2, 3.5->4, 5->4).
JAXFP4_HD uint32_t e2m1_encode(float v) {
  if (v != v) return 0x7u;
  const float a = std::fabs(v);
  const uint32_t code = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) +
                        (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return code | ((float_to_bits(v) >> 28) & 0x8u);
}

// The same codes as e2m1_encode with fewer instructions (what the CUDA
// quantize kernel runs per element). For c = min(|v|, 6) the magnitude code is
// the round-half-even of g(c) = min(2c, c + 2, c/2 + 4): one line per binade
// of E2M1 (code steps of 0.5, 1 and 2), and g is concave, so the min picks the
// line of c's binade; the tie points of g are exactly e2m1_encode's midpoints,
// and an even code is one with mantissa bit 0. Rounding commutes with min, so
// each line is rounded on its own, by adding it to kE2M1Magic = 2^23 + 4 in
// one float operation (ulp 1 there, and 2^23 + 4 is even; 2c and c/2 are
// exact, so a fused or an unfused multiply-add rounds the same).
constexpr float kE2M1Magic = 8388612.0f;  // 2^23 + 4, bits 0x4B000004

// min(a, b) for a b that is never NaN; a NaN `a` gives b (fminf's rule). The
// host form is a compare, which compilers inline; both are tested exhaustively.
JAXFP4_HD float min_keep_b(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fminf(a, b);
#else
  return a < b ? a : b;
#endif
}

// kE2M1Magic + the magnitude code (0..7) of e2m1_encode(v), as a float (its
// bits are 0x4B000004 + code), for every v; NaN gives 7. The float form lets
// the kernel pack codes with integer multiply-adds.
JAXFP4_HD float e2m1_magnitude_float(float v) {
  const float c = min_keep_b(std::fabs(v), 6.0f);
  return min_keep_b(min_keep_b(c * 2.0f + kE2M1Magic, c + (kE2M1Magic + 2.0f)), c * 0.5f + (kE2M1Magic + 4.0f));
}

// e2m1_encode(v) for every float v, NaN included.
JAXFP4_HD uint32_t e2m1_encode_fast(float v) {
  const uint32_t code = float_to_bits(e2m1_magnitude_float(v)) - float_to_bits(kE2M1Magic);
  return v != v ? code : code | ((float_to_bits(v) >> 28) & 0x8u);
}

// ---- E4M3 (spec section 2) -------------------------------------------------

JAXFP4_HD float e4m3_decode(uint8_t b) {
  const uint32_t s = b >> 7, e = (b >> 3) & 0xFu, m = b & 7u;
  float v;
  if (e == 0xF && m == 7) {
    v = bits_to_float(0x7FC00000u);  // NaN
  } else if (e == 0) {
    v = static_cast<float>(m) * (1.0f / 512.0f);  // subnormal: m * 2^-9
  } else {
    v = bits_to_float(((e + 120u) << 23) | (m << 20));  // rebias 7 -> 127
  }
  return s ? -v : v;
}

// Round-to-nearest-even, saturating finite: <= 2^-10 -> 0x00, > 448 -> 0x7E,
// NaN -> 0x7F. Only non-negative inputs occur (block maxima times positive
// scales); a negative input keeps its sign bit.
JAXFP4_HD uint8_t e4m3_encode_satfinite(float v) {
  if (v != v) return kE4M3NaN;
  const uint32_t sign = (float_to_bits(v) >> 24) & 0x80u;
  float a = std::fabs(v);
  if (a >= kE4M3Max) return static_cast<uint8_t>(sign | 0x7Eu);
  if (a < 0.015625f) {
    // Subnormal range (below 2^-6): quantum 2^-9. a * 512 is exact; round it
    // to the nearest integer with ties to even.
    const float q = a * 512.0f;
    float r = std::floor(q);
    const float frac = q - r;
    if (frac > 0.5f || (frac == 0.5f && std::fmod(r, 2.0f) != 0.0f)) r += 1.0f;
    return static_cast<uint8_t>(sign | static_cast<uint32_t>(r));  // r == 8 is 2^-6, code 0x08
  }
  // Normal: keep 3 mantissa bits of the float32, rounding the dropped 20 bits
  // to nearest even; a carry into the exponent is the correct next binade.
  uint32_t u = float_to_bits(a);
  const uint32_t lsb = (u >> 20) & 1u;
  u += 0x7FFFFu + lsb;
  const uint32_t e = ((u >> 23) & 0xFFu) - 120u, m = (u >> 20) & 7u;
  if (e > 15u || (e == 15u && m == 7u)) return static_cast<uint8_t>(sign | 0x7Eu);
  return static_cast<uint8_t>(sign | (e << 3) | m);
}

// ---- Block quantization (spec section 2, in exactly the spec's order) -------

// Scale of one block from its NaN-propagating max |x| and gs = 1/g.
JAXFP4_HD uint8_t block_scale(float vmax, float gs) {
  return e4m3_encode_satfinite(gs * (vmax * recip6()));
}

// The factor every element of the block is multiplied by before rounding.
JAXFP4_HD float block_output_scale(uint8_t sf, float gs) {
  return sf == 0 ? 0.0f : 1.0f / (e4m3_decode(sf) * (1.0f / gs));
}

// NaN-propagating max of |a| and b (b already a max of magnitudes).
JAXFP4_HD float nan_max_abs(float b, float a) {
  a = std::fabs(a);
  return (a != a || b != b) ? bits_to_float(0x7FC00000u) : (a > b ? a : b);
}

// ---- Scale-factor layouts (spec section 3) ---------------------------------

JAXFP4_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Padded [rows, cols] of the scale array for R rows and C = K/16 columns.
JAXFP4_HD int64_t sf_rows(SfLayout l, int64_t R) {
  return l == SfLayout::kLinear ? R : round_up(R, l == SfLayout::kSwizzled128x4 ? 128 : 8);
}
JAXFP4_HD int64_t sf_cols(SfLayout l, int64_t C) {
  return l == SfLayout::kLinear ? C : round_up(C, 4);
}

// Byte offset of logical scale (m, c) in a scale array of C logical columns.
JAXFP4_HD int64_t sf_offset(SfLayout l, int64_t m, int64_t c, int64_t C) {
  switch (l) {
    case SfLayout::kSwizzled128x4: {
      const int64_t Cp = round_up(C, 4);
      return (m / 128) * (Cp / 4) * 512 + (c / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + (c % 4);
    }
    case SfLayout::kSwizzled8x4: {
      const int64_t Cp = round_up(C, 4);
      return (m / 8) * (Cp / 4) * 32 + (c / 4) * 32 + (m % 8) * 4 + (c % 4);
    }
    default:
      return m * C + c;
  }
}

// Inverse of sf_offset over the padded array: the logical (m, c) stored at
// byte `off`; entries with m >= R or c >= C are padding (always 0x00).
JAXFP4_HD void sf_position(SfLayout l, int64_t off, int64_t C, int64_t* m, int64_t* c) {
  switch (l) {
    case SfLayout::kSwizzled128x4: {
      const int64_t tiles_c = round_up(C, 4) / 4, tile = off / 512, r = off % 512;
      *m = (tile / tiles_c) * 128 + ((r % 16) / 4) * 32 + r / 16;
      *c = (tile % tiles_c) * 4 + r % 4;
      return;
    }
    case SfLayout::kSwizzled8x4: {
      const int64_t tiles_c = round_up(C, 4) / 4, tile = off / 32, r = off % 32;
      *m = (tile / tiles_c) * 8 + r / 4;
      *c = (tile % tiles_c) * 4 + r % 4;
      return;
    }
    default:
      *m = off / C;
      *c = off % C;
  }
}

}  // namespace jaxfp4
