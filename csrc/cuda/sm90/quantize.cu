// NVFP4 quantization on the GPU (Hopper and up; plain CUDA, no sm_90a-only
// instructions): the FFI handlers of `jaxfp4_quantize` (static g) and
// `jaxfp4_quantize_dynamic` (g from the finite amax), nvfp4-spec.md section 2,
// bit-identical to jaxfp4/reference.py and the CPU handlers: every number is
// computed by the __host__ __device__ functions of jaxfp4/format.h.
//
// Work unit: 8 consecutive elements of a row (one 16-byte load for 16-bit
// inputs, two for float32), i.e. half a scale block. The two halves of a block
// sit in neighbouring lanes (even lane = first half), exchange their partial
// NaN-propagating max with one shuffle, and each writes its 4 code bytes (one
// 32-bit store; a warp writes 128 contiguous bytes); the even lane writes the
// scale byte. A grid-stride loop keeps several loads in flight per thread.
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
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

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
constexpr int kUnroll = 4;         // units (8 elements each) per thread per iteration
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
  uint32_t* data;         // [*L, M, K/2] viewed as 32-bit words (one per unit)
  uint8_t* scales;        // [*L, Rp, Cp] (or [*L, M, C] linear)
  uint32_t units;         // total units = rows * K/8 (< 2^31)
  FastDiv upr;            // units per row (K/8)
  FastDiv rows_per_batch; // M
  int32_t m_rows;         // M
  int32_t c_cols;         // C = K/16
  int32_t layout;         // SfLayout
  int32_t g_mode;         // 0: g[b], 1: g[0] (one g for all), 2: via the batch map
  int64_t scale_stride;   // bytes of scales per batch entry (Rp*Cp)
  int64_t batch;          // output batch entries
  int64_t pad_words;      // per batch entry: (Rp-M)*(Cp/4) all-padding 32-bit words
  int64_t pad_bytes;      // per batch entry: M*(Cp-C) padding columns
  BatchMap map;           // a = x (never broadcast), b = g
};

// Loads the 8 elements of a unit as float (exact conversions).
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

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const QuantizeParams p) {
  const SfLayout layout = static_cast<SfLayout>(p.layout);
  const uint32_t nthreads = gridDim.x * blockDim.x;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const bool even = (threadIdx.x & 1u) == 0;

  // One g for everything (the usual static activation scale): load it before the
  // data, so the two loads' latencies overlap instead of adding up (small M is
  // latency-bound).
  int64_t cached_b = -1;
  float gs = 0.0f;
  if (p.g_mode == 1) {
    gs = 1.0f / __ldg(p.g);
    cached_b = 0;  // every batch entry shares it: never reloaded below
  }

  // The loop bound is uniform over the grid, so every lane of a warp takes
  // part in every shuffle. nthreads is even and so is `units` (K/8 is even):
  // unit u and its partner u^1 sit in lanes tid and tid^1, both valid or not.
  for (uint64_t base = 0; base < p.units; base += static_cast<uint64_t>(nthreads) * kUnroll) {
    float v[kUnroll][8];
    uint32_t unit[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const uint64_t u = base + static_cast<uint64_t>(j) * nthreads + tid;
      unit[j] = static_cast<uint32_t>(u);
      if (u < p.units) {
        Load8<T>::run(p.x, static_cast<int64_t>(u) * 8, v[j]);  // x is [rows, K]: unit u = elements 8u..8u+7
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[j][i] = 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const uint32_t u = unit[j];
      const bool valid = base + static_cast<uint64_t>(j) * nthreads + tid < p.units;
      float vmax = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) vmax = nan_max_abs(vmax, v[j][i]);
      vmax = nan_max_abs(vmax, __shfl_xor_sync(0xFFFFFFFFu, vmax, 1));
      if (!valid) continue;

      const uint32_t r = p.upr.div(u);
      const uint32_t jj = u - r * p.upr.d;
      const uint32_t b = p.rows_per_batch.div(r);
      if (p.g_mode != 1 && static_cast<int64_t>(b) != cached_b) {
        cached_b = b;
        const int64_t gi = p.g_mode == 0 ? static_cast<int64_t>(b) : p.g_mode == 1 ? 0 : p.map.b_index(b);
        gs = 1.0f / __ldg(p.g + gi);
      }
      const uint8_t sf = block_scale(vmax, gs);
      const float os = block_output_scale(sf, gs);
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) word |= e2m1_encode(v[j][i] * os) << (4 * i);
      p.data[u] = word;
      if (even) {
        const uint32_t m = r - b * p.rows_per_batch.d;
        p.scales[static_cast<int64_t>(b) * p.scale_stride + sf_offset(layout, m, jj >> 1, p.c_cols)] = sf;
      }
    }
  }

  // Padding of swizzled layouts: whole 4-column words of rows M..Rp-1, then the
  // bytes of columns C..Cp-1 of rows 0..M-1 (bytes beside valid scales that
  // other threads write; byte stores never touch their neighbours).
  const int64_t per_batch = p.pad_words + p.pad_bytes;
  if (per_batch == 0) return;
  const int64_t total = per_batch * p.batch;
  const int64_t cp = round_up(p.c_cols, 4), groups = cp / 4;
  auto pad = [&](auto i) {  // i: int64_t, or uint32_t when everything fits (no 64-bit division)
    using I = decltype(i);
    const I b = i / static_cast<I>(per_batch), k = i - b * static_cast<I>(per_batch);
    uint8_t* s = p.scales + static_cast<int64_t>(b) * p.scale_stride;
    if (k < static_cast<I>(p.pad_words)) {
      const int64_t m = p.m_rows + k / static_cast<I>(groups), c = (k % static_cast<I>(groups)) * 4;
      *reinterpret_cast<uint32_t*>(s + sf_offset(layout, m, c, p.c_cols)) = 0u;
    } else {
      const I k2 = k - static_cast<I>(p.pad_words), extra = static_cast<I>(cp - p.c_cols);
      const int64_t m = k2 / extra, c = p.c_cols + k2 % extra;
      s[sf_offset(layout, m, c, p.c_cols)] = 0;
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

// Resident blocks per SM, per kernel (3 quantize, 3 amax) and device; 0 = not yet asked.
std::atomic<int> g_blocks_per_sm[6][kMaxDevices];

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
  if (!aligned(x.untyped_data(), 16) || !aligned(data.untyped_data(), 4) || !aligned(scales.untyped_data(), 4)) {
    return ffi::Error::InvalidArgument(name + ": buffers must be 16-byte (x) and 4-byte (data, scales) aligned");
  }
  int g_mode = 0;
  if (g_dims != nullptr) {
    bool g_identity = true, g_single = true;
    for (int64_t i = 0; i < rank; ++i) {
      g_identity = g_identity && g_dims[i] == map.out_dims[i];
      g_single = g_single && g_dims[i] == 1;
    }
    g_mode = g_identity ? 0 : g_single ? 1 : 2;
  }
  p->x = x.untyped_data();
  p->data = static_cast<uint32_t*>(data.untyped_data());
  p->scales = static_cast<uint8_t*>(scales.untyped_data());
  p->units = static_cast<uint32_t>(units);
  p->upr = FastDiv(static_cast<uint32_t>(K > 0 ? K / 8 : 1));
  p->rows_per_batch = FastDiv(static_cast<uint32_t>(M > 0 ? M : 1));
  p->m_rows = static_cast<int32_t>(M);
  p->c_cols = static_cast<int32_t>(C);
  p->layout = sf_layout;
  p->g_mode = g_mode;
  p->scale_stride = Rp * Cp;
  p->batch = map.count;
  p->pad_words = layout == SfLayout::kLinear ? 0 : (Rp - M) * (Cp / 4);
  p->pad_bytes = layout == SfLayout::kLinear ? 0 : M * (Cp - C);
  p->map = map;
  return ffi::Error::Success();
}

ffi::Error launch_quantize(cudaStream_t stream, InputType type, const QuantizeParams& p) {
  const int64_t pad = (p.pad_words + p.pad_bytes) * p.batch;
  if (p.units == 0 && pad == 0) return ffi::Error::Success();
  const int64_t work = std::max<int64_t>(p.units, pad);
  const void* kernels[3] = {reinterpret_cast<const void*>(quantize_kernel<float>),
                            reinterpret_cast<const void*>(quantize_kernel<__nv_bfloat16_raw>),
                            reinterpret_cast<const void*>(quantize_kernel<__half>)};
  const int dev = current_device();
  int per_sm = blocks_per_sm(type, kernels[type], kThreads, dev);
  per_sm = per_sm <= 0 ? 2 : std::min(per_sm, kMaxBlocksPerSm);
  const int64_t cap = static_cast<int64_t>(sm_count(dev)) * per_sm;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
  switch (type) {
    case kF32: quantize_kernel<float><<<blocks, kThreads, 0, stream>>>(p); break;
    case kBF16: quantize_kernel<__nv_bfloat16_raw><<<blocks, kThreads, 0, stream>>>(p); break;
    case kF16: quantize_kernel<__half><<<blocks, kThreads, 0, stream>>>(p); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("jaxfp4 quantize launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename T>
ffi::Error launch_amax(cudaStream_t stream, int type_index, const void* x, float* g, int64_t batch,
                       int64_t units_per_batch) {
  const int dev = current_device();
  // A cooperative grid must be co-resident: never more than occupancy allows.
  const int per_sm = blocks_per_sm(3 + type_index, reinterpret_cast<const void*>(amax_kernel<T>), kAmaxThreads, dev);
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
  record_kernel("quantize", "sm90_quantize");
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
  return launch_quantize(stream, type, p);
}

ffi::Error QuantizeDynamicImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                               ffi::Result<ffi::AnyBuffer> scales, ffi::Result<ffi::AnyBuffer> g,
                               int32_t sf_layout) {
  record_kernel("quantize", "sm90_quantize_dynamic");
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
  if (p.batch == 0) return ffi::Error::Success();
  const int64_t units_per_batch = static_cast<int64_t>(p.units) / p.batch;
  ffi::Error err = ffi::Error::Success();
  switch (type) {
    case kF32: err = launch_amax<float>(stream, 0, p.x, gp, p.batch, units_per_batch); break;
    case kBF16: err = launch_amax<__nv_bfloat16_raw>(stream, 1, p.x, gp, p.batch, units_per_batch); break;
    case kF16: err = launch_amax<__half>(stream, 2, p.x, gp, p.batch, units_per_batch); break;
  }
  if (err.failure()) return err;
  return launch_quantize(stream, type, p);
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
