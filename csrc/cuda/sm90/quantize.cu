// NVFP4 quantization on the GPU (Hopper and up; plain CUDA, no sm_90a-only
// instructions): the FFI handlers of `jaxfp4_quantize` (static g) and
// `jaxfp4_quantize_dynamic` (g from the finite amax), nvfp4-spec.md section 2,
// bit-identical to jaxfp4/reference.py and the CPU handlers.
//
// Work unit: one scale block (16 consecutive elements of a row) per thread:
// two 16-byte loads for 16-bit inputs (four for float32), one 8-byte store of
// codes (a warp writes 256 contiguous bytes) and one scale byte. A grid-stride
// loop handles kUnroll blocks per trip so that their loads are in flight
// together. The kernel must not be issue-bound (an earlier version that ran
// 8-element units in lane pairs, both lanes computing the block's scales,
// reached 35% of copy bandwidth on 8192x8192 bf16), so the work per element
// is cut to the bone, every shortcut computing exactly the spec's numbers:
// - the block max |x| of 16-bit inputs runs on packed pairs (HMNMX2.NAN):
//   max is exact, and NaN propagates;
// - the scale byte and its decoded value come from the hardware E4M3
//   conversions (round-to-nearest-even, satfinite, NaN -> 0x7F), the output
//   scale from the same float operations as format.h's block_output_scale
//   (1/g hoisted, __frcp_rn == IEEE 1.0f / x), or, with one g and several
//   blocks per thread, from a per-CTA table of block_output_scale itself for
//   all 256 scale bytes; the driver's `check` mode compares the conversions
//   with format.h's over all their inputs;
// - each element's magnitude code comes from format.h's e2m1_magnitude_float
//   (3 FMNMX and 3 FMA-pipe operations instead of 7 compares), the 8 codes of
//   a 32-bit word are packed with integer multiply-adds and their sign bits
//   gathered from the inputs' with byte permutes. This equals e2m1_encode for
//   every product x * os that is not NaN and has x's sign, so this path runs
//   only for blocks whose max |x| and output scale are finite and os >= +0;
//   any other block (NaN, Inf, a weird g) takes format.h's e2m1_encode
//   element by element.
// The same launch then writes every padded entry of a swizzled scale array
// (rows M..Rp-1 as 32-bit words, columns C..Cp-1 as bytes), so the results
// never depend on what the buffers held before: ONE launch for static g.
//
// Dynamic g: TWO launches and no scratch memory. Launch 1 is a cooperative
// kernel (all blocks co-resident): it zeroes g, grid-syncs, reduces the finite
// |x| per batch entry (block reduce + one atomicMax per block on the float
// bits, which order like unsigned integers for non-negative floats),
// grid-syncs, and turns the amax into g = amax / 2688 (1 when amax is 0) in
// the g result itself. Launch 2 is the static kernel reading that g.
// (The FFI ScratchAllocator is deliberately not used: its memory is freed when
// the handler returns, and under XLA command buffers the handler is traced
// once into a CUDA graph that keeps the freed address for every replay.)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

#include "jaxfp4/batch.h"
#include "jaxfp4/ffi_checks.h"
#include "jaxfp4/format.h"
#include "jaxfp4/registry.h"
#include "../device.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace cg = cooperative_groups;

namespace jaxfp4 {
namespace {

constexpr int kThreads = 256;      // quantize kernel block size
constexpr int kUnroll = 2;         // scale blocks per thread per loop trip
constexpr int kMaxBlocksPerSm = 8; // cap of the persistent quantize grid (occupancy permitting)
constexpr int kAmaxThreads = 512;  // amax (cooperative) kernel block size
constexpr int kAmaxUnroll = 4;

// Unsigned division by a run-time constant for dividends and divisors < 2^31
// (multiply-high and shift; the construction of CUTLASS's FastDivmod).
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    if (d > 1) {
      uint32_t l = 0;
      while ((1ull << l) < d) ++l;  // ceil(log2 d)
      const uint32_t p = 31 + l;
      mul = static_cast<uint32_t>(((1ull << p) + d - 1) / d);
      shift = p - 32;
    }
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return d == 1 ? n : (__umulhi(n, mul) >> shift);
  }
};

struct QuantizeParams {
  const void* x;          // [*Lx, M, K]
  const float* g;         // [*Lg] decode scales
  uint2* data;            // [*L, M, K/2] viewed as 8-byte words (one per scale block)
  uint8_t* scales;        // [*L, Rp, Cp] (or [*L, M, C] linear)
  uint32_t blocks;        // total scale blocks = rows * C (< 2^30)
  FastDiv cols;           // C = K/16: block index -> row
  FastDiv rows_per_batch; // M: row -> batch entry
  int32_t m_rows;         // M
  int32_t c_cols;         // C
  int32_t c_padded;       // Cp
  int32_t g_mode;         // 0: g[b], 1: g[0] (one g for all), 2: via the batch map
  bool flat_rows;         // M == Rp: row r of the flattened batch has scale row r
  bool wide_offsets;      // the scale array has >= 2^32 bytes: 64-bit offsets
  bool os_table;          // tabulate the output scales per CTA (one g, several blocks per thread)
  int64_t scale_stride;   // bytes of scales per batch entry (Rp*Cp)
  int64_t batch;          // output batch entries
  int64_t pad_words;      // per batch entry: (Rp-M)*(Cp/4) all-padding 32-bit words
  int64_t pad_bytes;      // per batch entry: M*(Cp-C) padding columns
  BatchMap map;           // a = x (never broadcast), b = g
};

// Loads the 8 elements of a unit as float (exact conversions); the amax kernel's input.
template <typename T>
struct Load8;

template <>
struct Load8<float> {
  static __device__ __forceinline__ void run(const void* base, int64_t elem, float (&v)[8]) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + elem);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};

template <>
struct Load8<__nv_bfloat16_raw> {
  static __device__ __forceinline__ void run(const void* base, int64_t elem, float (&v)[8]) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + elem));
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(u[i] << 16);
      v[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
    }
  }
};

template <>
struct Load8<__half> {
  static __device__ __forceinline__ void run(const void* base, int64_t elem, float (&v)[8]) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + elem));
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[i] & 0xFFFFu)));
      v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u[i] >> 16)));
    }
  }
};

// ---- one scale block of 16 inputs, kept as the raw 32-bit words loaded ----

// PTX prmt: byte n of the result is byte (sel >> 4n) & 7 of {b, a}; where bit 3
// of that nibble is set, it is 0xFF or 0x00 by the sign bit of that byte.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

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

  __device__ __forceinline__ float value(int i) const;

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
    return half_to_float(static_cast<uint16_t>(max(pair & 0xFFFFu, pair >> 16)));
  }

  // Signs of elements first .. first+7 (first = 0 or 8) at bits 4i + 3: the
  // sign bytes (1 and 3) of words first/2 .. first/2 + 3, gathered and
  // sign-replicated.
  __device__ __forceinline__ uint32_t signs8(int first) const {
    const uint32_t* v = w + first / 2;
    const uint32_t a = prmt(v[0], v[1], 0x7531u), b = prmt(v[2], v[3], 0x7531u);
    return sign_bits8(prmt(a, b, 0xECA8u), prmt(a, b, 0xFDB9u));
  }

  static __device__ __forceinline__ float half_to_float(uint16_t h);
};

template <>
__device__ __forceinline__ float Block16<__nv_bfloat16_raw>::value(int i) const {
  return __uint_as_float(i & 1 ? w[i / 2] & 0xFFFF0000u : w[i / 2] << 16);
}
template <>
__device__ __forceinline__ float Block16<__nv_bfloat16_raw>::half_to_float(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}
template <>
__device__ __forceinline__ float Block16<__half>::value(int i) const {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(i & 1 ? w[i / 2] >> 16 : w[i / 2] & 0xFFFFu)));
}
template <>
__device__ __forceinline__ float Block16<__half>::half_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

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

// Byte offset of scale (m, c) within one batch entry, 32-bit (sf_offset's
// formulas with shifts; used while the whole scale array has < 2^32 bytes).
template <SfLayout L>
__device__ __forceinline__ uint32_t scale_offset32(uint32_t m, uint32_t c, uint32_t C, uint32_t cp) {
  switch (L) {
    case SfLayout::kSwizzled128x4:
      return (m >> 7) * (cp << 7) + (c >> 2) * 512u + (m & 31u) * 16u + ((m >> 5) & 3u) * 4u + (c & 3u);
    case SfLayout::kSwizzled8x4:
      return (m >> 3) * (cp << 3) + (c >> 2) * 32u + (m & 7u) * 4u + (c & 3u);
    default:
      return m * C + c;
  }
}

// Issues the loads of one loop trip: blocks base, base + nthreads, ...
template <typename Blk>
__device__ __forceinline__ void load_trip(const QuantizeParams& p, Blk (&blk)[kUnroll], uint32_t base,
                                          uint32_t nthreads) {
#pragma unroll
  for (int j = 0; j < kUnroll; ++j) {
    const uint32_t b = base + j * nthreads;
    if (b < p.blocks) blk[j].load(p.x, b);
  }
}

// kOneG: one g for every batch entry and scale rows that follow the rows of
// the flattened batch (p.g_mode == 1, p.flat_rows, !p.wide_offsets): the
// usual activation quantization, with no per-block batch arithmetic. When
// each thread has several blocks (p.os_table), the output scale of every
// scale byte is tabulated once per CTA: a shared-memory load per block instead
// of a division (for one block per thread, small M, the table's set-up would
// only add latency).
template <typename T, SfLayout L, bool kOneG>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const QuantizeParams p) {
  static_assert(kThreads == 256, "the output-scale table has one entry per thread");
  using Blk = typename BlockOf<T>::type;
  const uint32_t nthreads = gridDim.x * blockDim.x;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;

  // gs = 1/g and the 1/gs of block_output_scale, per batch entry (computed
  // once per entry a thread meets). One g for everything is requested before
  // the data and divided after the data loads are issued, so that the two
  // loads' latencies overlap instead of adding up (small M is latency-bound).
  const float g_all = kOneG ? __ldg(p.g) : 0.0f;
  Blk blk[kUnroll];
  load_trip(p, blk, tid, nthreads);
  float gs = 0.0f, inv_gs = 0.0f;
  if (kOneG) {
    gs = 1.0f / g_all;
    inv_gs = 1.0f / gs;
  }
  int64_t cached_e = -1;
  __shared__ float os_of_sf[256];
  const bool table = kOneG && p.os_table;
  if (table) {
    os_of_sf[threadIdx.x] = block_output_scale(static_cast<uint8_t>(threadIdx.x), gs);
    __syncthreads();
  }

  for (uint32_t base = tid; base < p.blocks; base += nthreads * kUnroll) {
    if (base != tid) load_trip(p, blk, base, nthreads);  // the first trip's loads are issued above
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const uint32_t b = base + j * nthreads;
      if (b >= p.blocks) break;
      const uint32_t r = p.cols.div(b), c = b - r * p.cols.d;  // row of the flattened batch, block column
      size_t off;  // of the scale byte
      if (kOneG) {
        off = scale_offset32<L>(r, c, p.c_cols, p.c_padded);
      } else {
        const uint32_t e = p.rows_per_batch.div(r), m = r - e * p.rows_per_batch.d;  // batch entry, its row
        if (static_cast<int64_t>(e) != cached_e) {
          cached_e = e;
          gs = 1.0f / __ldg(p.g + (p.g_mode == 1 ? 0 : p.g_mode == 0 ? static_cast<int64_t>(e) : p.map.b_index(e)));
          inv_gs = 1.0f / gs;
        }
        if (p.wide_offsets) {
          off = static_cast<size_t>(e) * p.scale_stride + sf_offset(L, m, c, p.c_cols);
        } else {
          off = e * static_cast<uint32_t>(p.scale_stride) + scale_offset32<L>(m, c, p.c_cols, p.c_padded);
        }
      }

      // block_scale and block_output_scale of format.h, operation for operation.
      const float vmax = blk[j].abs_max();
      const uint32_t sf = e4m3_encode_hw(gs * (vmax * recip6()));
      const float os = table ? os_of_sf[sf] : sf == 0 ? 0.0f : __frcp_rn(e4m3_decode_hw(sf) * inv_gs);
      const bool finite = max(float_to_bits(vmax), float_to_bits(os)) < 0x7F800000u;  // both in [+0, FLT_MAX]
      p.data[b] = finite ? make_uint2(pack8_fast(blk[j], 0, os), pack8_fast(blk[j], 8, os))
                         : pack16_exact(blk[j], os);
      p.scales[off] = static_cast<uint8_t>(sf);
    }
  }

  // Padding of swizzled layouts: whole 4-column words of rows M..Rp-1, then the
  // bytes of columns C..Cp-1 of rows 0..M-1 (bytes beside valid scales that
  // other threads write; byte stores never touch their neighbours).
  if (L == SfLayout::kLinear) return;
  const int64_t per_batch = p.pad_words + p.pad_bytes;
  if (per_batch == 0) return;
  const int64_t total = per_batch * p.batch;
  const int64_t cp = p.c_padded, groups = cp / 4;
  auto pad = [&](auto i) {  // i: int64_t, or uint32_t when everything fits (no 64-bit division)
    using I = decltype(i);
    const I b = i / static_cast<I>(per_batch), k = i - b * static_cast<I>(per_batch);
    uint8_t* s = p.scales + static_cast<int64_t>(b) * p.scale_stride;
    if (k < static_cast<I>(p.pad_words)) {
      const int64_t m = p.m_rows + k / static_cast<I>(groups), c = (k % static_cast<I>(groups)) * 4;
      *reinterpret_cast<uint32_t*>(s + sf_offset(L, m, c, p.c_cols)) = 0u;
    } else {
      const I k2 = k - static_cast<I>(p.pad_words), extra = static_cast<I>(cp - p.c_cols);
      const int64_t m = k2 / extra, c = p.c_cols + k2 % extra;
      s[sf_offset(L, m, c, p.c_cols)] = 0;
    }
  };
  if (total < (int64_t{1} << 31)) {
    for (uint32_t i = tid; i < static_cast<uint32_t>(total); i += nthreads) pad(i);
  } else {
    for (int64_t i = tid; i < total; i += nthreads) pad(i);
  }
}

// Launch 1 of dynamic quantization: g[b] = finite amax of batch entry b / 2688
// (1 when 0). Must be launched cooperatively (grid.sync).
template <typename T>
__global__ void __launch_bounds__(kAmaxThreads) amax_kernel(const void* x, float* g, int64_t batch,
                                                            int64_t units_per_batch, int32_t parts) {
  cg::grid_group grid = cg::this_grid();
  unsigned int* gbits = reinterpret_cast<unsigned int*>(g);
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t gthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = gtid; b < batch; b += gthreads) gbits[b] = 0u;
  grid.sync();

  __shared__ float warp_max[kAmaxThreads / 32];
  const int64_t tasks = batch * parts;
  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {  // block-uniform
    const int64_t b = task / parts, part = task % parts;
    const int64_t stride = static_cast<int64_t>(parts) * blockDim.x;
    float m = 0.0f;
    for (int64_t u0 = part * blockDim.x + threadIdx.x; u0 < units_per_batch; u0 += stride * kAmaxUnroll) {
      float v[kAmaxUnroll][8];
#pragma unroll
      for (int j = 0; j < kAmaxUnroll; ++j) {
        const int64_t u = u0 + j * stride;
        if (u < units_per_batch) {
          Load8<T>::run(x, (b * units_per_batch + u) * 8, v[j]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[j][i] = 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < kAmaxUnroll; ++j) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float a = fabsf(v[j][i]);
          if (a <= 3.402823466e38f) m = fmaxf(m, a);  // finite only: NaN and Inf fail
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
      m = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
      if (threadIdx.x == 0 && m > 0.0f) atomicMax(gbits + b, __float_as_uint(m));
    }
    __syncthreads();  // warp_max is reused by the next task
  }
  grid.sync();

  for (int64_t b = gtid; b < batch; b += gthreads) {
    const float amax = __uint_as_float(__ldcg(gbits + b));
    g[b] = amax == 0.0f ? 1.0f : amax / 2688.0f;
  }
}

// ---- host side ----------------------------------------------------------------

// Resident blocks per SM, per kernel (18 quantize: 3 input types x 3 layouts x
// one g or not, then 3 amax) and device; 0 = not yet asked.
constexpr int kAmaxSlot = 18;
std::atomic<int> g_blocks_per_sm[21][kMaxDevices];

// cudaOccupancyMaxActiveBlocksPerMultiprocessor, cached (a host query: no sync).
int blocks_per_sm(int kernel_slot, const void* kernel, int threads, int dev) {
  std::atomic<int>& cached = g_blocks_per_sm[kernel_slot][device_slot(dev)];
  int n = cached.load(std::memory_order_relaxed);
  if (n <= 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess || n <= 0) {
      cudaGetLastError();  // clear it; the launch below reports real failures
      return 0;
    }
    cached.store(n, std::memory_order_relaxed);
  }
  return n;
}

enum InputType { kF32 = 0, kBF16 = 1, kF16 = 2 };

bool input_type(ffi::DataType t, InputType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = kF32; return true;
    case ffi::DataType::BF16: *out = kBF16; return true;
    case ffi::DataType::F16: *out = kF16; return true;
    default: return false;
  }
}

bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// Shapes shared by both handlers. `g_dims` is nullptr for dynamic g (then the
// batch axes are x's). Fills `p` except the g pointer.
ffi::Error prepare(const char* who, ffi::AnyBuffer x, const int64_t* g_dims, int64_t g_rank,
                   ffi::AnyBuffer data, ffi::AnyBuffer scales, int32_t sf_layout, QuantizeParams* p,
                   InputType* type) {
  const std::string name(who);
  if (!input_type(x.element_type(), type)) {
    return ffi::Error::InvalidArgument(name + ": x must be F32, BF16 or F16");
  }
  if (data.element_type() != ffi::DataType::U8) return ffi::Error::InvalidArgument(name + ": data must be U8");
  if (scales.element_type() != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(name + ": scales must be F8E4M3FN");
  }
  if (sf_layout < 0 || sf_layout > 2) {
    return ffi::Error::InvalidArgument(name + ": sf_layout must be 0 (linear), 1 (128x4) or 2 (8x4)");
  }
  const auto xd = x.dimensions();
  const int64_t rank = static_cast<int64_t>(xd.size()) - 2;
  if (rank < 0) return ffi::Error::InvalidArgument(name + ": x must have rank >= 2, got " + dims_str(xd));
  if (rank > kMaxBatchRank) return ffi::Error::InvalidArgument(name + ": too many batch axes");
  const int64_t M = xd[rank], K = xd[rank + 1];
  if (K % kBlock != 0) return ffi::Error::InvalidArgument(name + ": K must be a multiple of 16, x is " + dims_str(xd));
  BatchMap map;
  if (g_dims != nullptr) {
    // g broadcasts to x's batch axes (each axis equal or 1); x itself never broadcasts.
    bool g_ok = g_rank == rank;
    for (int64_t i = 0; g_ok && i < rank; ++i) g_ok = g_dims[i] == xd[i] || g_dims[i] == 1;
    if (!g_ok || !make_batch_map(xd.begin(), g_dims, static_cast<int>(rank), &map)) {
      return ffi::Error::InvalidArgument(name + ": g must have x's batch axes (each equal or 1), x is " +
                                         dims_str(xd));
    }
  } else {
    make_batch_map(xd.begin(), xd.begin(), static_cast<int>(rank), &map);
  }
  const SfLayout layout = static_cast<SfLayout>(sf_layout);
  const int64_t C = K / kBlock, Rp = sf_rows(layout, M), Cp = sf_cols(layout, C);
  const auto dd = data.dimensions(), sd = scales.dimensions();
  bool ok = static_cast<int64_t>(dd.size()) == rank + 2 && static_cast<int64_t>(sd.size()) == rank + 2;
  for (int64_t i = 0; ok && i < rank; ++i) ok = dd[i] == map.out_dims[i] && sd[i] == map.out_dims[i];
  ok = ok && dd[rank] == M && dd[rank + 1] == K / 2 && sd[rank] == Rp && sd[rank + 1] == Cp;
  if (!ok) {
    return ffi::Error::InvalidArgument(name + ": results data " + dims_str(dd) + " / scales " + dims_str(sd) +
                                       " do not match x " + dims_str(xd) + " and sf_layout " +
                                       std::to_string(sf_layout));
  }
  const int64_t rows = map.count * M;
  const int64_t units = rows * (K / 8);
  if (units >= (int64_t{1} << 31) || M >= (int64_t{1} << 31) || C >= (int64_t{1} << 30)) {
    return ffi::Error::InvalidArgument(name + ": tensor too large (more than 2^34 elements)");
  }
  if (!aligned(x.untyped_data(), 16) || !aligned(data.untyped_data(), 8) || !aligned(scales.untyped_data(), 4)) {
    return ffi::Error::InvalidArgument(name + ": buffers must be 16-byte (x), 8-byte (data) and 4-byte (scales) aligned");
  }
  // Dynamic g has x's batch axes (identity); one g serves all when there is one entry.
  bool g_identity = true, g_ones = true;
  for (int64_t i = 0; g_dims != nullptr && i < rank; ++i) {
    g_identity = g_identity && g_dims[i] == map.out_dims[i];
    g_ones = g_ones && g_dims[i] == 1;
  }
  const bool g_single = map.count <= 1 || (g_dims != nullptr && g_ones);
  const int g_mode = g_single ? 1 : g_identity ? 0 : 2;
  p->x = x.untyped_data();
  p->data = static_cast<uint2*>(data.untyped_data());
  p->scales = static_cast<uint8_t*>(scales.untyped_data());
  p->blocks = static_cast<uint32_t>(rows * C);
  p->cols = FastDiv(static_cast<uint32_t>(C > 0 ? C : 1));
  p->rows_per_batch = FastDiv(static_cast<uint32_t>(M > 0 ? M : 1));
  p->m_rows = static_cast<int32_t>(M);
  p->c_cols = static_cast<int32_t>(C);
  p->c_padded = static_cast<int32_t>(Cp);
  p->g_mode = g_mode;
  p->flat_rows = Rp == M;
  p->wide_offsets = map.count * Rp * Cp >= (int64_t{1} << 32);
  p->scale_stride = Rp * Cp;
  p->batch = map.count;
  p->pad_words = layout == SfLayout::kLinear ? 0 : (Rp - M) * (Cp / 4);
  p->pad_bytes = layout == SfLayout::kLinear ? 0 : M * (Cp - C);
  p->map = map;
  return ffi::Error::Success();
}

template <typename T, SfLayout L, bool kOneG>
ffi::Error launch_quantize_as(cudaStream_t stream, int kernel_slot, const QuantizeParams& p) {
  const int64_t pad = (p.pad_words + p.pad_bytes) * p.batch;
  if (p.blocks == 0 && pad == 0) return ffi::Error::Success();
  const int dev = current_device();
  int per_sm = blocks_per_sm(kernel_slot, reinterpret_cast<const void*>(quantize_kernel<T, L, kOneG>), kThreads, dev);
  per_sm = per_sm <= 0 ? 2 : std::min(per_sm, kMaxBlocksPerSm);
  const int64_t cap = static_cast<int64_t>(sm_count(dev)) * per_sm;
  // Up to one scale block per thread (small M: all loads at once), then the
  // persistent grid (large M: kUnroll blocks per loop trip).
  const int64_t work = std::max<int64_t>(p.blocks, pad);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
  QuantizeParams q = p;
  q.os_table = kOneG && p.blocks > static_cast<int64_t>(blocks) * kThreads;
  quantize_kernel<T, L, kOneG><<<blocks, kThreads, 0, stream>>>(q);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("jaxfp4 quantize launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename T, SfLayout L>
ffi::Error launch_quantize_g(cudaStream_t stream, int kernel_slot, const QuantizeParams& p) {
  return p.g_mode == 1 && p.flat_rows && !p.wide_offsets
             ? launch_quantize_as<T, L, true>(stream, 2 * kernel_slot, p)
             : launch_quantize_as<T, L, false>(stream, 2 * kernel_slot + 1, p);
}

template <typename T>
ffi::Error launch_quantize_layout(cudaStream_t stream, int type_index, int32_t sf_layout, const QuantizeParams& p) {
  const int slot = 3 * type_index + sf_layout;
  switch (static_cast<SfLayout>(sf_layout)) {
    case SfLayout::kSwizzled128x4: return launch_quantize_g<T, SfLayout::kSwizzled128x4>(stream, slot, p);
    case SfLayout::kSwizzled8x4: return launch_quantize_g<T, SfLayout::kSwizzled8x4>(stream, slot, p);
    default: return launch_quantize_g<T, SfLayout::kLinear>(stream, slot, p);
  }
}

ffi::Error launch_quantize(cudaStream_t stream, InputType type, int32_t sf_layout, const QuantizeParams& p) {
  switch (type) {
    case kF32: return launch_quantize_layout<float>(stream, kF32, sf_layout, p);
    case kBF16: return launch_quantize_layout<__nv_bfloat16_raw>(stream, kBF16, sf_layout, p);
    default: return launch_quantize_layout<__half>(stream, kF16, sf_layout, p);
  }
}

template <typename T>
ffi::Error launch_amax(cudaStream_t stream, int type_index, const void* x, float* g, int64_t batch,
                       int64_t units_per_batch) {
  const int dev = current_device();
  // A cooperative grid must be co-resident: never more than occupancy allows.
  const int per_sm = blocks_per_sm(kAmaxSlot + type_index, reinterpret_cast<const void*>(amax_kernel<T>), kAmaxThreads, dev);
  if (per_sm <= 0) return ffi::Error::Internal("jaxfp4 quantize_dynamic: occupancy query failed");
  const int64_t resident = static_cast<int64_t>(sm_count(dev)) * per_sm;
  const int64_t per_block = static_cast<int64_t>(kAmaxThreads) * kAmaxUnroll;  // units one block pass covers
  const int64_t want = std::max<int64_t>(batch, batch * ((units_per_batch + per_block - 1) / per_block));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(want, resident));
  // Blocks per batch entry when there are more blocks than entries.
  int32_t parts = static_cast<int32_t>(std::max<int64_t>(1, blocks / std::max<int64_t>(batch, 1)));
  void* args[] = {const_cast<void**>(&x), &g, &batch, &units_per_batch, &parts};
  cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(amax_kernel<T>),
                                                dim3(static_cast<unsigned>(blocks)), dim3(kAmaxThreads), args, 0,
                                                stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxfp4 quantize_dynamic amax launch: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

ffi::Error QuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> data,
                        ffi::Result<ffi::AnyBuffer> scales, int32_t sf_layout) {
  if (g.element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument("jaxfp4_quantize: g must be F32");
  const auto gd = g.dimensions();
  QuantizeParams p{};
  InputType type;
  if (auto err = prepare("jaxfp4_quantize", x, gd.begin(), static_cast<int64_t>(gd.size()), *data, *scales,
                         sf_layout, &p, &type);
      err.failure()) {
    return err;
  }
  if (!aligned(g.untyped_data(), 4)) return ffi::Error::InvalidArgument("jaxfp4_quantize: g must be 4-byte aligned");
  p.g = static_cast<const float*>(g.untyped_data());
  record_kernel("quantize", "sm90_quantize");  // after validation: a rejected call ran nothing
  return launch_quantize(stream, type, sf_layout, p);
}

ffi::Error QuantizeDynamicImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                               ffi::Result<ffi::AnyBuffer> scales, ffi::Result<ffi::AnyBuffer> g,
                               int32_t sf_layout) {
  QuantizeParams p{};
  InputType type;
  if (auto err = prepare("jaxfp4_quantize_dynamic", x, nullptr, 0, *data, *scales, sf_layout, &p, &type);
      err.failure()) {
    return err;
  }
  const auto xd = x.dimensions(), gd = g->dimensions();
  bool ok = g->element_type() == ffi::DataType::F32 && gd.size() + 2 == xd.size();
  for (size_t i = 0; ok && i < gd.size(); ++i) ok = gd[i] == xd[i];
  if (!ok) {
    return ffi::Error::InvalidArgument("jaxfp4_quantize_dynamic: result g must be F32 with x's batch axes, got " +
                                       dims_str(gd) + " for x " + dims_str(xd));
  }
  if (!aligned(g->untyped_data(), 4)) {
    return ffi::Error::InvalidArgument("jaxfp4_quantize_dynamic: g must be 4-byte aligned");
  }
  float* gp = static_cast<float*>(g->untyped_data());
  p.g = gp;
  record_kernel("quantize", "sm90_quantize_dynamic");  // after validation: a rejected call ran nothing
  if (p.batch == 0) return ffi::Error::Success();
  const int64_t units_per_batch = 2 * static_cast<int64_t>(p.blocks) / p.batch;  // 8-element units
  ffi::Error err = ffi::Error::Success();
  switch (type) {
    case kF32: err = launch_amax<float>(stream, 0, p.x, gp, p.batch, units_per_batch); break;
    case kBF16: err = launch_amax<__nv_bfloat16_raw>(stream, 1, p.x, gp, p.batch, units_per_batch); break;
    case kF16: err = launch_amax<__half>(stream, 2, p.x, gp, p.batch, units_per_batch); break;
  }
  if (err.failure()) return err;
  return launch_quantize(stream, type, sf_layout, p);
}

}  // namespace
}  // namespace jaxfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4QuantizeCuda, jaxfp4::QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x [*L, M, K]
                                  .Arg<ffi::AnyBuffer>()  // g [*L] F32
                                  .Ret<ffi::AnyBuffer>()  // data U8 [*L, M, K/2]
                                  .Ret<ffi::AnyBuffer>()  // scales F8E4M3FN
                                  .Attr<int32_t>("sf_layout"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4QuantizeDynamicCuda, jaxfp4::QuantizeDynamicImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x [*L, M, K]
                                  .Ret<ffi::AnyBuffer>()  // data U8 [*L, M, K/2]
                                  .Ret<ffi::AnyBuffer>()  // scales F8E4M3FN
                                  .Ret<ffi::AnyBuffer>()  // g [*L] F32
                                  .Attr<int32_t>("sf_layout"),
                              {ffi::Traits::kCmdBufferCompatible});
