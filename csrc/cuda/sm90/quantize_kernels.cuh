// The quantize and amax kernels (device code only) of quantize.cu, which
// includes this file once and whose header comment describes their design.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "jaxfp4/batch.h"
#include "jaxfp4/format.h"
#include "quantize_block.cuh"

namespace jaxfp4 {
namespace {  // private to quantize.cu, the one file that includes this

namespace cg = cooperative_groups;
using namespace quantize_block;  // Block16, BlockF32, the E4M3 conversions, pack8_fast, pack16_exact

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
  uint16_t* decoded;      // jaxfp4_quantize_decoded: [*L, M, K] bf16 bits
  const float* g_b;       // jaxfp4_quantize_decoded: the other operand's g, g's shape
  float* g_ab;            // jaxfp4_quantize_decoded: g * g_b (float32), g's shape
  int64_t g_count;        // elements of g
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
// bf16 and fp16: one 16-byte load.
template <typename T>
struct Load8 {
  static __device__ __forceinline__ void run(const void* base, int64_t elem, float (&v)[8]) {
    unpack8<T>(__ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + elem)), v);
  }
};

template <>
struct Load8<float> {
  static __device__ __forceinline__ void run(const void* base, int64_t elem, float (&v)[8]) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + elem);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};

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
  // Programmatic dependent launch (device.cuh): the GEMM that usually follows
  // may be scheduled now and set up while this kernel runs; this kernel reads
  // nothing before the kernel it follows has completed.
  allow_dependent_launch();
  grid_dependency_wait();

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
      const uint32_t sf = block_scale_hw(vmax, gs);
      const float os = table ? os_of_sf[sf] : block_output_scale_hw(sf, inv_gs);
      p.data[b] = encode16(blk[j], vmax, os);
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

// Four elements of x as float (exact), from element `elem` (a multiple of 4).
template <typename T>
__device__ __forceinline__ void load4(const void* x, size_t elem, float (&v)[4]) {
  if constexpr (std::is_same<T, float>::value) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(x) + elem));
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  } else {
    const uint2 a = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(x) + elem));
    v[0] = half_bits_to_float<T>(a.x & 0xFFFFu); v[1] = half_bits_to_float<T>(a.x >> 16);
    v[2] = half_bits_to_float<T>(a.y & 0xFFFFu); v[3] = half_bits_to_float<T>(a.y >> 16);
  }
}

// jaxfp4_quantize_decoded: x quantized with g and written as the values it
// stands for, bf16(e2m1(q) * SF) (exact: at most 5 significant bits, 2^-10 ..
// 2688), and g * g_b: the W4A16 operands of gemm's decoded W4A4 route, whose
// inputs are M <= 32 rows. For them the quantize kernel's one lane per block is
// a long dependent chain on few SMs (~3 us for 16 x 8192), so four lanes take a
// block, four elements each: the block's max |x| (as bits: with the sign
// cleared, NaN > Inf > finite, so any NaN wins, as Block16::abs_max) meets
// over two shuffles, then each lane runs format.h's arithmetic on its four
// (the quantize kernel's exact path: block_scale, block_output_scale,
// e2m1_encode of __fmul_rn(x, os)), decodes and stores 8 bytes.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_decoded_kernel(const QuantizeParams p) {
  allow_dependent_launch();
  grid_dependency_wait();
  // The product the GEMM that follows scales by (an XLA multiply would be a
  // kernel of its own): float32 g * g_b, as the W4A4 kernel computes it.
  if (blockIdx.x == 0)
    for (int64_t i = threadIdx.x; i < p.g_count; i += blockDim.x) p.g_ab[i] = __ldg(p.g + i) * __ldg(p.g_b + i);
  const uint32_t lanes = 4 * p.blocks, nthreads = gridDim.x * blockDim.x;
  // Warp-uniform trip count (the shuffles need every lane of the warp).
  for (uint32_t t0 = blockIdx.x * blockDim.x + (threadIdx.x & ~31u); t0 < lanes; t0 += nthreads) {
    const uint32_t t = t0 + (threadIdx.x & 31u);
    const bool live = t < lanes;
    const uint32_t b = live ? t >> 2 : 0, part = t & 3u;
    int64_t gi = 0;
    if (p.g_mode != 1) {
      const uint32_t e = p.rows_per_batch.div(p.cols.div(b));  // the block's batch entry
      gi = p.g_mode == 0 ? static_cast<int64_t>(e) : p.map.b_index(e);
    }
    const float g = __ldg(p.g + gi);
    float v[4];
    load4<T>(p.x, static_cast<size_t>(b) * kBlock + 4 * part, v);
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) m = max(m, float_to_bits(v[i]) & 0x7FFFFFFFu);
    m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, 1));
    m = max(m, __shfl_xor_sync(0xFFFFFFFFu, m, 2));
    const float gs = 1.0f / g, inv_gs = 1.0f / gs;  // as quantize_kernel
    const uint32_t sf = block_scale_hw(bits_to_float(m), gs);
    const float os = block_output_scale_hw(sf, inv_gs), s = e4m3_decode_hw(sf);
    uint32_t w[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float lo = e2m1_decode(e2m1_encode(__fmul_rn(v[2 * j], os))) * s;
      const float hi = e2m1_decode(e2m1_encode(__fmul_rn(v[2 * j + 1], os))) * s;
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[j]) : "f"(hi), "f"(lo));
    }
    if (live) {
      *reinterpret_cast<uint2*>(p.decoded + static_cast<size_t>(b) * kBlock + 4 * part) = make_uint2(w[0], w[1]);
    }
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

}  // namespace
}  // namespace jaxfp4
