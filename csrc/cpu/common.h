// Helpers shared by the CPU FFI handlers (csrc/cpu/quantize.cc, gemm.cc):
// exact host conversions between float and bf16/f16, buffer-dtype dispatch for
// F32/BF16/F16 rows, NVFP4 row decoding, and the argument checks of
// csrc/README.md. Internal to the CPU handlers.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "jaxfp4/batch.h"
#include "jaxfp4/ffi_checks.h"
#include "jaxfp4/format.h"
#include "xla/ffi/api/ffi.h"

namespace jaxfp4::cpu {

namespace ffi = xla::ffi;
using Dims = ffi::AnyBuffer::Dimensions;

// ---- float <-> bf16 / f16, bit exact, round-to-nearest-even ----------------

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // carries give inf correctly
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return bits_to_float(sign | 0x7F800000u | (m << 13));  // inf / nan
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x1FFu));  // quiet NaN
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 (and inf) -> inf
  if (a >= 0x38800000u) {  // normal f16 (>= 2^-14): rebias 127 -> 15, round 13 bits
    const uint32_t r = a - 0x38000000u;
    return static_cast<uint16_t>(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
  }
  const uint32_t e = a >> 23;
  if (e < 102) return sign;  // < 2^-25 rounds to (signed) zero
  // Subnormal f16, unit 2^-24: mant * 2^(e-126).
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u, shift = 126u - e;  // 14..24
  uint32_t r = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;  // r == 0x400 is the smallest normal
  return static_cast<uint16_t>(sign | r);
}

// ---- float rows in F32 / BF16 / F16 buffers --------------------------------

inline bool is_float_dtype(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// dst[0..n) = float(src[off..off+n)), src being a buffer of float dtype t.
inline void load_floats(const void* src, ffi::DataType t, int64_t off, int64_t n, float* dst) {
  if (t == ffi::DataType::F32) {
    std::memcpy(dst, static_cast<const float*>(src) + off, static_cast<size_t>(n) * sizeof(float));
  } else if (t == ffi::DataType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(s[i]);
  }
}

// dst[off..off+n) = round(scale * src[0..n)) in dst's float dtype t (RNE).
inline void store_floats(const float* src, float scale, int64_t n, void* dst, ffi::DataType t, int64_t off) {
  if (t == ffi::DataType::F32) {
    float* d = static_cast<float*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = scale * src[i];
  } else if (t == ffi::DataType::BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(scale * src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_f16(scale * src[i]);
  }
}

// ---- NVFP4 rows -------------------------------------------------------------

// Decoded (low, high) E2M1 pair of every packed byte.
struct E2m1PairTable {
  float v[256][2];
  E2m1PairTable() {
    for (uint32_t b = 0; b < 256; ++b) {
      v[b][0] = e2m1_decode(b & 0xFu);
      v[b][1] = e2m1_decode(b >> 4);
    }
  }
};
inline const E2m1PairTable& e2m1_pairs() {
  static const E2m1PairTable table;
  return table;
}

// dst[k] = e2m1(q[k]) * SF[m, k/16] for one packed row of K elements (exact in
// float32); `sf` is the scale array of this row's batch entry.
inline void decode_row(const uint8_t* q, const uint8_t* sf, SfLayout layout, int64_t m, int64_t C,
                       float* dst) {
  const E2m1PairTable& t = e2m1_pairs();
  for (int64_t c = 0; c < C; ++c) {
    const float s = e4m3_decode(sf[sf_offset(layout, m, c, C)]);
    const uint8_t* qb = q + c * (kBlock / 2);
    float* d = dst + c * kBlock;
    for (int j = 0; j < kBlock / 2; ++j) {
      d[2 * j] = t.v[qb[j]][0] * s;
      d[2 * j + 1] = t.v[qb[j]][1] * s;
    }
  }
}

// ---- argument checks ---------------------------------------------------------

inline int64_t prod(const int64_t* d, int n) {
  int64_t p = 1;
  for (int i = 0; i < n; ++i) p *= d[i];
  return p;
}

inline ffi::Error parse_layout(int32_t v, const char* attr, SfLayout* out) {
  if (v < 0 || v > 2)
    return ffi::Error::InvalidArgument(std::string(attr) + " must be 0 (linear), 1 (128x4) or 2 (8x4), got " +
                                       std::to_string(v));
  *out = static_cast<SfLayout>(v);
  return ffi::Error::Success();
}

// dims_str and check_buffer come from jaxfp4/ffi_checks.h (shared with the CUDA handlers).

// Scales of R rows and C = K/16 columns in `layout`: F8E4M3FN [*lead, Rp, Cp].
inline ffi::Error check_scales(const ffi::AnyBuffer& buf, const char* name, SfLayout layout, const int64_t* lead,
                               int nlead, int64_t R, int64_t C) {
  return check_buffer(buf, name, ffi::DataType::F8E4M3FN, lead, nlead, sf_rows(layout, R), sf_cols(layout, C));
}

// Global scale g: F32 of rank nlead, each dim equal to lead's or 1 (broadcast).
// On success *map maps a flat index over `lead` (map->b_index is the identity)
// to g's flat index (map->a_index).
inline ffi::Error check_global_scale(const ffi::AnyBuffer& g, const char* name, const int64_t* lead, int nlead,
                                     BatchMap* map) {
  const Dims d = g.dimensions();
  if (g.element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument(std::string(name) + " must be float32");
  bool ok = static_cast<int>(d.size()) == nlead;
  for (int i = 0; ok && i < nlead; ++i) ok = d[i] == lead[i] || d[i] == 1;
  if (!ok || !make_batch_map(d.begin(), lead, nlead, map))
    return ffi::Error::InvalidArgument(std::string(name) + " has shape " + dims_str(d) +
                                       ", expected one entry per batch entry (rank " + std::to_string(nlead) + ")");
  return ffi::Error::Success();
}

inline ffi::Error check_rank(const ffi::AnyBuffer& buf, const char* name, int min_rank) {
  const int r = static_cast<int>(buf.dimensions().size());
  if (r < min_rank || r - 2 > kMaxBatchRank)
    return ffi::Error::InvalidArgument(std::string(name) + " has rank " + std::to_string(r) + ", expected 2.." +
                                       std::to_string(kMaxBatchRank + 2));
  return ffi::Error::Success();
}

}  // namespace jaxfp4::cpu
