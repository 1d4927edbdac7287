// Device pieces both small-M GEMM kernels share (gemm_small_m.cu, plain
// weights; gemm_small_m_packed.cuh, prepare_weights' order): the launch
// parameters, load and conversion helpers, the exact dequantization of a
// 32-bit code word, one chunk's mma steps, the output store and the kernel
// prologue. gemm_small_m.cu's header comment describes the mma mapping, the
// dequantization and the weight orders.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../ptx.cuh"
#include "jaxfp4/batch.h"
#include "jaxfp4/format.h"

namespace jaxfp4 {
namespace sm90_gemm {

constexpr int kChunk = 64;        // K elements per chunk
constexpr int kTPW = 2;           // 16-row tiles per warp
constexpr int kPackedChunkBytes = 512;   // codes of one tile x chunk (sm90 packing)
constexpr int kPackedScaleBytes = 64;    // scales of one tile x chunk (sm90 packing)

enum OutType : int { kOutF32 = 0, kOutBF16 = 1, kOutF16 = 2 };

// The fused op's epilogue (jaxfp4/primitives/fused_gemm.py EPILOGUE_IDS).
enum Epilogue : int {
  kEpilogueNone = 0,
  // out [M, N/2] bf16 = silu(gate) * up of the rounded product, whose rows
  // alternate gate and up in blocks of 8 (jaxfp4.interleave_gate_up): rows 0-7
  // of a 16-row tile are gate, rows 8-15 up, so elements j and j + 2 of one mma
  // C fragment (rows r and r + 8) are the two halves of one output.
  kEpilogueSwiGluInterleaved = 1,
  // jaxfp4.RotaryKVCache (a link of jaxfp4_gemm_chain): the weight's heads have
  // their halves interleaved by 8 (jaxfp4.interleave_rotary), so rows r and r + 8
  // of a tile are dims d and d + D/2 of one head, the pair RoPE rotates together.
  // q heads -> out [M, heads * D] rotated; k heads rotated and v heads as they are
  // -> the caches' slot rows.
  kEpilogueRotaryKV = 2,
};

struct Params {
  const void* a;            // W4A16: T [*La, M, K]; W4A4: U8 codes [*La, M, K/2]
  const uint8_t* a_sf;      // W4A4: scales of a
  const float* a_g;         // W4A4: [*La]
  const uint8_t* b;         // plain [*Lb, N, K/2] or packed [*Lb, T, 8 Kp]
  const uint8_t* b_sf;      // plain (b_sf_layout) or packed [*Lb, T, Kp]
  const float* b_g;         // [*Lb]
  void* out;                // [*L, M, N]
  int32_t out_type;
  int32_t M, N, K, C;       // C = K / 16
  int32_t tiles, chunks;    // ceil(N/16), ceil(K/64)
  int32_t chunks_per_warp;  // plain: a warp's chunks per group; packed: per warp and ring item
  int32_t items;            // packed: ring items per group
  int32_t a_sf_layout, b_sf_layout;
  // 1: no kernel launched before this one in its call writes the weights (a
  // later link of jaxfp4_gemm_chain), so the packed kernel's producer copies
  // them before griddepcontrol.wait. 0 (any other launch): after it. Beside
  // b, tiles and items: the producer reads it before its first copy, and a
  // launch's parameters miss the constant cache at first (see Prologue).
  int32_t weights_ready = 0;
  int64_t a_stride;         // per batch entry: elements (W4A16) or bytes (W4A4)
  int64_t a_sf_stride;      // bytes per batch entry (W4A4)
  int64_t b_stride, b_sf_stride;  // bytes per batch entry
  int64_t a_sf_cstride, b_sf_cstride;  // scale offset step of one chunk (4 blocks)
  BatchMap map;
  // The fused op (jaxfp4_gemm_fused: one batch entry, bf16 a; W4A4 where a_g is set):
  const __nv_bfloat16* residual = nullptr;  // [M, N] added to the rounded output, or null (any kernel)
  const __nv_bfloat16* norm_w = nullptr;    // prologue kPrologueRmsNorm: the RMSNorm weight [K]
  float eps = 0.0f;                         // its epsilon
  int32_t prologue = 0;                     // gemm_fused_prologue.cuh: what the fused kernel stages
  int32_t epilogue = 0;                     // kEpilogue*: what the packed kernel's store computes
  // kEpilogueRotaryKV: per token row m the rotation cos/sin [M, D/2] and the
  // cache row slot [M] (b * T + position; outside [0, kv_rows): not written);
  // caches [kv_rows, kv_heads, D] bf16.
  const float* rope_cos = nullptr;
  const float* rope_sin = nullptr;
  const int32_t* kv_slot = nullptr;
  __nv_bfloat16* k_cache = nullptr;
  __nv_bfloat16* v_cache = nullptr;
  int32_t heads = 0, kv_heads = 0, head_dim = 0, kv_rows = 0;
};

// ---- device helpers -----------------------------------------------------------

// Streamed weights: read once, so no L1 allocation; 256-byte L2 prefetch.
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 ld_stream8_pred(const void* p, bool pred) {
  uint2 v = make_uint2(0, 0);
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %3, 0;\n"
      "  @q ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2]; }"
      : "+r"(v.x), "+r"(v.y)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

__device__ __forceinline__ uint32_t ld_u8(const void* p) {
  uint16_t v;
  asm volatile("ld.global.nc.u8 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ld_u8_pred(const void* p, bool pred) {
  uint16_t v = 0;
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %2, 0;\n"
      "  @q ld.global.nc.u8 %0, [%1]; }"
      : "+h"(v)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

// Activations: re-read from L2 by every CTA, so allocate in L1 too.
__device__ __forceinline__ uint4 ld_act16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_act16_pred(const void* p, bool pred) {
  uint4 v = make_uint4(0, 0, 0, 0);
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %5, 0;\n"
      "  @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4]; }"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

__device__ __forceinline__ uint2 ld_act8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 ld_act8_pred(const void* p, bool pred) {
  uint2 v = make_uint2(0, 0);
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %3, 0;\n"
      "  @q ld.global.nc.v2.u32 {%0, %1}, [%2]; }"
      : "+r"(v.x), "+r"(v.y)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}

__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t lds_u16(uint32_t a) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(a) : "memory");
  return v;
}

// Two E4M3 bytes (low byte first) -> f16x2, exact (NaN stays NaN).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t v) {
  uint32_t d;
  const uint16_t h = static_cast<uint16_t>(v);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(h));
  return d;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float hi, float lo) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b);
template <>
__device__ __forceinline__ uint32_t mul2<__nv_bfloat16>(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
template <>
__device__ __forceinline__ uint32_t mul2<__half>(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int S>
__device__ __forceinline__ uint32_t shift(uint32_t x) {
  if constexpr (S >= 0) {
    return x << S;
  } else {
    return x >> (-S);
  }
}

// One bf16x2/f16x2 register of raw codes: the magnitude bits shifted by MS,
// the sign bits by SS, into the target positions of the element type. (Plain
// shifts and masks: ptxas balances them between the ALU and FMA pipes itself;
// spelling the shifts as multiplies moved work off the ALU pipe but lengthened
// the dependency chains and ran slower on an H200.)
template <bool F16, int MS, int SS>
__device__ __forceinline__ uint32_t take(uint32_t x) {
  constexpr uint32_t kSign = 0x80008000u;
  constexpr uint32_t kMag = F16 ? 0x0E000E00u : 0x01C001C0u;
  if constexpr (MS == SS) {
    return shift<MS>(x) & (kMag | kSign);
  } else {
    return (shift<MS>(x) & kMag) | (shift<SS>(x) & kSign);
  }
}

// The 4 code registers of a 32-bit word (times 2^-126 for bf16, 2^-14 for fp16).
// Packed word: pair p (elements 2p, 2p+1: low / high half) has its magnitude
// at bits 3p..3p+2 and its sign at bit {13, 12, 15, 14}[p] of each half.
// Plain word: nibble j at bits 4j; pair p = elements (p, p+4).
template <bool F16, bool PACKED>
__device__ __forceinline__ void codes4(uint32_t x, uint32_t (&r)[4]) {
  if constexpr (PACKED) {
    if constexpr (F16) {
      r[0] = take<true, 9, 2>(x);
      r[1] = take<true, 6, 3>(x);
      r[2] = take<true, 3, 0>(x);
      r[3] = take<true, 0, 1>(x);
    } else {
      r[0] = take<false, 6, 2>(x);
      r[1] = take<false, 3, 3>(x);
      r[2] = take<false, 0, 0>(x);
      r[3] = take<false, -3, 1>(x);
    }
  } else {
    if constexpr (F16) {
      r[0] = take<true, 9, 12>(x);
      r[1] = take<true, 5, 8>(x);
      r[2] = take<true, 1, 4>(x);
      r[3] = take<true, -3, 0>(x);
    } else {
      r[0] = take<false, 6, 12>(x);
      r[1] = take<false, 2, 8>(x);
      r[2] = take<false, -2, 4>(x);
      r[3] = take<false, -6, 0>(x);
    }
  }
}

// Scale pair (byte 0: row g, byte 1: row g+8) -> per-row broadcast multipliers
// S = SF * 2^119 (bf16) or SF * 2^7 (fp16).
template <typename T>
__device__ __forceinline__ void scale_pair(uint32_t sf2, uint32_t& s0, uint32_t& s1);
template <>
__device__ __forceinline__ void scale_pair<__nv_bfloat16>(uint32_t sf2, uint32_t& s0, uint32_t& s1) {
  const uint32_t h = e4m3x2_to_f16x2(sf2);
  const __half2 hh = *reinterpret_cast<const __half2*>(&h);
  const float f0 = __low2float(hh) * 0x1p119f;
  const float f1 = __high2float(hh) * 0x1p119f;
  s0 = pack_bf16x2(f0, f0);
  s1 = pack_bf16x2(f1, f1);
}
template <>
__device__ __forceinline__ void scale_pair<__half>(uint32_t sf2, uint32_t& s0, uint32_t& s1) {
  const uint32_t h = mul2<__half>(e4m3x2_to_f16x2(sf2), 0x58005800u);  // * 2^7
  s0 = prmt(h, h, 0x1010);
  s1 = prmt(h, h, 0x3232);
}

struct Stage {
  uint4 w[kTPW];           // codes: words (row g, h0), (row g, h1), (row g+8, h0), (row g+8, h1)
  uint32_t sf[kTPW];       // scale bytes: row g | row g+8 << 8
};

template <int NT, bool A4>
struct ActStage {
  uint4 act[NT][A4 ? 1 : 2];  // A16: 8 words (16 elements); A4: .x/.y codes, .z scale byte
};

// Loads the activations of slot i (chunk c0 + i of the lane's pointers) into at.
// PRED: blk_ok false (the lane's block is past K) loads zeros; without PRED
// every load is issued (the caller knows the chunk is inside K).
template <int NT, bool A4, bool PRED = true>
__device__ __forceinline__ void load_act(ActStage<NT, A4>& at, const uint8_t* const (&ap)[NT],
                                         const uint8_t* const (&asp)[NT], int i, int64_t a_sf_cstride, bool blk_ok) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if constexpr (A4) {
      const uint8_t* q = ap[nt] + static_cast<int64_t>(i) * 32;
      const uint8_t* sf = asp[nt] + static_cast<int64_t>(i) * a_sf_cstride;
      const uint2 v = PRED ? ld_act8_pred(q, blk_ok) : ld_act8(q);
      const uint32_t sc = PRED ? ld_u8_pred(sf, blk_ok) : ld_u8(sf);
      at.act[nt][0] = make_uint4(v.x, v.y, sc, 0);
    } else {
      const uint8_t* q = ap[nt] + static_cast<int64_t>(i) * (kChunk * 2);
      at.act[nt][0] = PRED ? ld_act16_pred(q, blk_ok) : ld_act16(q);
      at.act[nt][1] = PRED ? ld_act16_pred(q + 16, blk_ok) : ld_act16(q + 16);
    }
  }
}

// The 4 mma steps of one chunk for the first TP (<= kTPW) weight tiles x NT token tiles.
template <typename T, int NT, bool PACKED, bool A4, int TP = kTPW>
__device__ __forceinline__ void mma_chunk(float (&acc)[kTPW][NT][4], const Stage& st, const ActStage<NT, A4>& at) {
  static_assert(TP >= 1 && TP <= kTPW, "TP weight tiles of the group's kTPW");
  constexpr bool kF16 = std::is_same<T, __half>::value;
  // B fragments of the 4 mma steps: b[nt][s][0..1].
  uint32_t b[NT][4][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if constexpr (A4) {
      uint32_t s0, s1;
      scale_pair<__nv_bfloat16>(at.act[nt][0].z, s0, s1);
      const uint32_t words[2] = {at.act[nt][0].x, at.act[nt][0].y};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t r[4];
        codes4<false, false>(words[h], r);  // pairs (j, j+4) of the plain nibble order
#pragma unroll
        for (int j = 0; j < 4; ++j) r[j] = mul2<__nv_bfloat16>(r[j], s0);
        if constexpr (PACKED) {
          // adjacent pairs (4q+0, 4q+1), (4q+2, 4q+3) for steps 2h, 2h+1
          b[nt][2 * h][0] = prmt(r[0], r[1], 0x5410);
          b[nt][2 * h][1] = prmt(r[2], r[3], 0x5410);
          b[nt][2 * h + 1][0] = prmt(r[0], r[1], 0x7632);
          b[nt][2 * h + 1][1] = prmt(r[2], r[3], 0x7632);
        } else {
          b[nt][2 * h][0] = r[0];
          b[nt][2 * h][1] = r[1];
          b[nt][2 * h + 1][0] = r[2];
          b[nt][2 * h + 1][1] = r[3];
        }
      }
    } else {
      const uint32_t v[8] = {at.act[nt][0].x, at.act[nt][0].y, at.act[nt][0].z, at.act[nt][0].w,
                             at.act[nt][1].x, at.act[nt][1].y, at.act[nt][1].z, at.act[nt][1].w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        if constexpr (PACKED) {
          b[nt][s][0] = v[2 * s];
          b[nt][s][1] = v[2 * s + 1];
        } else {
          const int h = s >> 1, q = s & 1;
          b[nt][s][0] = prmt(v[4 * h + q], v[4 * h + q + 2], 0x5410);
          b[nt][s][1] = prmt(v[4 * h + q], v[4 * h + q + 2], 0x7632);
        }
      }
    }
  }
#pragma unroll
  for (int tp = 0; tp < TP; ++tp) {
    uint32_t s0, s1;
    scale_pair<T>(st.sf[tp], s0, s1);
    const uint32_t words[4] = {st.w[tp].x, st.w[tp].y, st.w[tp].z, st.w[tp].w};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t rg[4], rg8[4];
      codes4<kF16, PACKED>(words[h], rg);
      codes4<kF16, PACKED>(words[2 + h], rg8);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const uint32_t a[4] = {mul2<T>(rg[2 * q], s0), mul2<T>(rg8[2 * q], s1), mul2<T>(rg[2 * q + 1], s0),
                               mul2<T>(rg8[2 * q + 1], s1)};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[tp][nt], a, b[nt][2 * h + q][0], b[nt][2 * h + q][1]);
      }
    }
  }
}

// Scales one output element by alpha and stores it (rows n >= N, tokens m >= M
// dropped). With a residual (bf16 out only): the bf16 product plus the residual,
// rounded again, which is what the unfused `residual + gemm(...)` computes.
__device__ __forceinline__ void store_out(const Params& p, int64_t out_base, float alpha, int n, int m, float v) {
  if (n < p.N && m < p.M) {
    const int64_t o = out_base + static_cast<int64_t>(m) * p.N + n;
    v *= alpha;
    if (p.residual != nullptr) v = __bfloat162float(__float2bfloat16_rn(v)) + __bfloat162float(p.residual[o]);
    if (p.out_type == kOutBF16) {
      static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16_rn(v);
    } else if (p.out_type == kOutF16) {
      static_cast<__half*>(p.out)[o] = __float2half_rn(v);
    } else {
      static_cast<float*>(p.out)[o] = v;
    }
  }
}

// The SwiGLU epilogue of one output (row n of the N/2 outputs, token m): gate
// and up (float32 sums) scaled and rounded to bf16 as the GEMM's output would
// be, then silu(gate) * up in float32 as the staged SwiGLU prologue computes it
// (gemm_staged_act.cuh swiglu_rows), rounded once: bit for bit the GEMM
// followed by that prologue's arithmetic. bf16 out only (the handlers check).
__device__ __forceinline__ void store_swiglu(const Params& p, int64_t out_base, float alpha, int n, int m, float gate,
                                             float up) {
  const int nh = p.N / 2;
  if (n < nh && m < p.M) {
    const float g = __bfloat162float(__float2bfloat16_rn(gate * alpha));
    const float u = __bfloat162float(__float2bfloat16_rn(up * alpha));
    static_cast<__nv_bfloat16*>(p.out)[out_base + static_cast<int64_t>(m) * nh + n] =
        __float2bfloat16_rn(__fdividef(g, 1.0f + __expf(-g)) * u);
  }
}

// The rotary epilogue of one row pair (pair n of the N/2: dims i and i + D/2 of
// head n / (D/2); token m): both halves scaled and rounded to bf16 as the
// GEMM's output would be, then (q and k heads) x1 cos - x2 sin, x2 cos + x1 sin
// in float32, each product and sum rounded on its own (no contraction: the
// jnp reference's order), rounded to bf16 and stored in place.
__device__ __forceinline__ void store_rotary(const Params& p, float alpha, int n, int m, float v1, float v2) {
  const int half = p.head_dim >> 1;
  if (n >= p.N / 2 || m >= p.M) return;
  const int head = n / half, i = n - head * half;
  float x1 = __bfloat162float(__float2bfloat16_rn(v1 * alpha));
  float x2 = __bfloat162float(__float2bfloat16_rn(v2 * alpha));
  if (head < p.heads + p.kv_heads) {
    const float c = p.rope_cos[static_cast<int64_t>(m) * half + i], s = p.rope_sin[static_cast<int64_t>(m) * half + i];
    const float r1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    const float r2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    x1 = r1;
    x2 = r2;
  }
  __nv_bfloat16* dst;
  if (head < p.heads) {
    dst = static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(m) * p.heads * p.head_dim +
          static_cast<int64_t>(head) * p.head_dim;
  } else {
    const int slot = p.kv_slot[m];
    if (slot < 0 || slot >= p.kv_rows) return;
    const int kv = head - p.heads;
    __nv_bfloat16* cache = kv < p.kv_heads ? p.k_cache : p.v_cache;
    dst = cache + (static_cast<int64_t>(slot) * p.kv_heads + kv % p.kv_heads) * p.head_dim;
  }
  dst[i] = __float2bfloat16_rn(x1);
  dst[i + half] = __float2bfloat16_rn(x2);
}

// ---- a warp's accumulators: kTPW weight tiles x NT token tiles of mma C fragments ----

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[kTPW][NT][4]) {
#pragma unroll
  for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[tp][nt][j] = 0.0f;
}

// The epilogue's factor: 2^7 g_b, W4A4 2^14 g_a g_b (both operands dequantized
// times 2^-7, gemm_small_m.cu's header).
template <bool A4>
__device__ __forceinline__ float epilogue_alpha(const Params& p, int64_t ia, int64_t ib) {
  if constexpr (A4) return (p.a_g[ia] * p.b_g[ib]) * 16384.0f;
  return p.b_g[ib] * 128.0f;
}

// A warp's row of a reduction buffer: element ((tp * NT + nt) * 4 + j) * 32 + lane.
template <int NT>
__device__ __forceinline__ void stash_acc(float* row, const float (&acc)[kTPW][NT][4], int lane) {
#pragma unroll
  for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) row[((tp * NT + nt) * 4 + j) * 32 + lane] = acc[tp][nt][j];
}

// Stores element j of lane ln's fragment of weight tile tile0 + tp and token
// tile nt (the mma C layout: rows ln/4 and ln/4 + 8, tokens 2 (ln%4) and +1).
__device__ __forceinline__ void store_frag(const Params& p, int64_t out_base, float alpha, int tile0, int m0, int tp,
                                           int nt, int j, int ln, float v) {
  store_out(p, out_base, alpha, (tile0 + tp) * 16 + (ln >> 2) + 8 * (j >> 1), m0 + 8 * nt + 2 * (ln & 3) + (j & 1),
            v);
}

// This CTA's balanced contiguous share [begin, end) of `count` work units
// (tile groups in the plain kernel, single tiles in the packed one).
__device__ __forceinline__ void cta_share(int64_t count, int& begin, int& end) {
  begin = static_cast<int>(static_cast<int64_t>(blockIdx.x) * count / gridDim.x);
  end = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * count / gridDim.x);
}

// What both kernels derive from the launch first: the batch entries, the
// CTA's tile groups (kTPW tiles each; a cta_share of them: the plain kernel's
// walk; the packed kernel shares out single tiles instead),
// the warp's K slice (chunks c0 .. c0 + chunks_per_warp - 1 of every group)
// and the lane's activation pointers at chunk c0 (the same for every group).
template <int NT, bool A4>
struct Prologue {
  int64_t z, ia, ib;     // output, activation and weight batch entries
  int m0;                // first token of the CTA's token tiles
  int g_begin, ngroups;  // the CTA's groups
  int c0;                // the warp's first chunk
  const uint8_t* ap[NT];   // activation codes/values of token m0 + 8 nt + g at chunk c0
  const uint8_t* asp[NT];  // W4A4: their scales

  __device__ __forceinline__ Prologue(const Params& p, int warp, int g, int t) {
    z = blockIdx.z;
    // Entry 0 is entry 0 of every operand: no branch on p.map.rank there, so
    // the kernel's first parameter loads are not held behind one round trip
    // (a launch's parameters miss the constant cache at first).
    ia = z == 0 ? 0 : p.map.a_index(z);
    ib = z == 0 ? 0 : p.map.b_index(z);
    m0 = blockIdx.y * (8 * NT);
    const int64_t groups = (static_cast<int64_t>(p.tiles) + kTPW - 1) / kTPW;
    int g_end;
    cta_share(groups, g_begin, g_end);
    ngroups = g_end - g_begin;
    c0 = warp * p.chunks_per_warp;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      // Tokens past M read token M-1: only their own output columns see them.
      const int64_t mm = min(m0 + 8 * nt + g, p.M - 1);
      if constexpr (A4) {
        ap[nt] = static_cast<const uint8_t*>(p.a) + ia * p.a_stride + mm * (p.K / 2) + static_cast<int64_t>(c0) * 32 +
                 t * 8;
        asp[nt] = p.a_sf + ia * p.a_sf_stride + sf_offset(static_cast<SfLayout>(p.a_sf_layout), mm, t, p.C) +
                  static_cast<int64_t>(c0) * p.a_sf_cstride;
      } else {
        ap[nt] = static_cast<const uint8_t*>(p.a) +
                 (ia * p.a_stride + mm * p.K + static_cast<int64_t>(c0) * kChunk + t * 16) * 2;
        asp[nt] = nullptr;
      }
    }
  }
};

}  // namespace sm90_gemm
}  // namespace jaxfp4
