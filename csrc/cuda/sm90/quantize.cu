// NVFP4 quantization on the GPU (Hopper and up; plain CUDA, no sm_90a-only
// instructions): the FFI handlers of `jaxfp4_quantize` (static g) and
// `jaxfp4_quantize_dynamic` (g from the finite amax), nvfp4-spec.md section 2,
// bit-identical to jaxfp4/reference.py and the CPU handlers, and of
// `jaxfp4_quantize_decoded` (static g: the quantized values e2m1(q) * SF in
// bf16 instead of codes and scales, and g * g_b, the W4A16 operands of gemm's
// decoded W4A4 route).
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
#include <cuda_bf16.h>
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
#include "quantize_decoded.h"
#include "quantize_kernels.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxfp4 {
namespace {

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

// Shapes shared by the handlers. `g_dims` is nullptr for dynamic g (then the
// batch axes are x's). The results are data and scales, or (data == nullptr)
// the decoded values. Fills `p` except the g pointer.
ffi::Error prepare(const char* who, ffi::AnyBuffer x, const int64_t* g_dims, int64_t g_rank,
                   const ffi::AnyBuffer* data, const ffi::AnyBuffer* scales, const ffi::AnyBuffer* decoded,
                   int32_t sf_layout, QuantizeParams* p, InputType* type) {
  const std::string name(who);
  if (!input_type(x.element_type(), type)) {
    return ffi::Error::InvalidArgument(name + ": x must be F32, BF16 or F16");
  }
  if (data != nullptr && data->element_type() != ffi::DataType::U8) {
    return ffi::Error::InvalidArgument(name + ": data must be U8");
  }
  if (scales != nullptr && scales->element_type() != ffi::DataType::F8E4M3FN) {
    return ffi::Error::InvalidArgument(name + ": scales must be F8E4M3FN");
  }
  if (decoded != nullptr && decoded->element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(name + ": the result must be BF16");
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
  if (decoded != nullptr) {
    const auto od = decoded->dimensions();
    bool ok = od.size() == xd.size();
    for (size_t i = 0; ok && i < od.size(); ++i) ok = od[i] == xd[i];
    if (!ok) return ffi::Error::InvalidArgument(name + ": result " + dims_str(od) + " must have x's shape " + dims_str(xd));
  } else {
    const auto dd = data->dimensions(), sd = scales->dimensions();
    bool ok = static_cast<int64_t>(dd.size()) == rank + 2 && static_cast<int64_t>(sd.size()) == rank + 2;
    for (int64_t i = 0; ok && i < rank; ++i) ok = dd[i] == map.out_dims[i] && sd[i] == map.out_dims[i];
    ok = ok && dd[rank] == M && dd[rank + 1] == K / 2 && sd[rank] == Rp && sd[rank + 1] == Cp;
    if (!ok) {
      return ffi::Error::InvalidArgument(name + ": results data " + dims_str(dd) + " / scales " + dims_str(sd) +
                                         " do not match x " + dims_str(xd) + " and sf_layout " +
                                         std::to_string(sf_layout));
    }
  }
  const int64_t rows = map.count * M;
  const int64_t units = rows * (K / 8);
  if (units >= (int64_t{1} << 31) || M >= (int64_t{1} << 31) || C >= (int64_t{1} << 30)) {
    return ffi::Error::InvalidArgument(name + ": tensor too large (more than 2^34 elements)");
  }
  if (!aligned(x.untyped_data(), 16) || (data != nullptr && !aligned(data->untyped_data(), 8)) ||
      (scales != nullptr && !aligned(scales->untyped_data(), 4)) ||
      (decoded != nullptr && !aligned(decoded->untyped_data(), 16))) {
    return ffi::Error::InvalidArgument(name +
                                       ": buffers must be 16-byte (x, decoded), 8-byte (data) and 4-byte (scales) aligned");
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
  p->data = data != nullptr ? static_cast<uint2*>(data->untyped_data()) : nullptr;
  p->scales = scales != nullptr ? static_cast<uint8_t*>(scales->untyped_data()) : nullptr;
  p->decoded = decoded != nullptr ? static_cast<uint16_t*>(decoded->untyped_data()) : nullptr;
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

// The CTAs (kThreads each) of `kernel` one wave holds on device dev: its
// occupancy (cached per kernel in `occupancy`; 2 a SM if the query fails), at
// most kMaxBlocksPerSm a SM.
int64_t wave_ctas(const void* kernel, std::atomic<int> (&occupancy)[kMaxDevices], int dev) {
  int per_sm = resident_ctas(kernel, kThreads, 0, occupancy, dev);
  per_sm = per_sm <= 0 ? 2 : std::min(per_sm, kMaxBlocksPerSm);
  return static_cast<int64_t>(sm_count(dev)) * per_sm;
}

template <typename T, SfLayout L, bool kOneG>
ffi::Error launch_quantize_as(cudaStream_t stream, const QuantizeParams& p) {
  const int64_t pad = (p.pad_words + p.pad_bytes) * p.batch;
  if (p.blocks == 0 && pad == 0) return ffi::Error::Success();
  static std::atomic<int> occupancy[kMaxDevices];
  auto kernel = quantize_kernel<T, L, kOneG>;
  const int64_t cap = wave_ctas(reinterpret_cast<const void*>(kernel), occupancy, current_device());
  // Up to one scale block per thread (small M: all loads at once), then the
  // persistent grid (large M: kUnroll blocks per loop trip).
  const int64_t work = std::max<int64_t>(p.blocks, pad);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
  QuantizeParams q = p;
  q.os_table = kOneG && p.blocks > static_cast<int64_t>(blocks) * kThreads;
  const cudaError_t err = launch_dependent(kernel, dim3(blocks), dim3(kThreads), 0, stream, q);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("jaxfp4 quantize launch: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename T, SfLayout L>
ffi::Error launch_quantize_g(cudaStream_t stream, const QuantizeParams& p) {
  return p.g_mode == 1 && p.flat_rows && !p.wide_offsets ? launch_quantize_as<T, L, true>(stream, p)
                                                         : launch_quantize_as<T, L, false>(stream, p);
}

template <typename T>
ffi::Error launch_quantize_layout(cudaStream_t stream, int32_t sf_layout, const QuantizeParams& p) {
  switch (static_cast<SfLayout>(sf_layout)) {
    case SfLayout::kSwizzled128x4: return launch_quantize_g<T, SfLayout::kSwizzled128x4>(stream, p);
    case SfLayout::kSwizzled8x4: return launch_quantize_g<T, SfLayout::kSwizzled8x4>(stream, p);
    default: return launch_quantize_g<T, SfLayout::kLinear>(stream, p);
  }
}

template <typename T>
ffi::Error launch_quantize_decoded_as(cudaStream_t stream, const QuantizeParams& p, bool programmatic) {
  static std::atomic<int> occupancy[kMaxDevices];
  auto kernel = quantize_decoded_kernel<T>;
  const int64_t cap = wave_ctas(reinterpret_cast<const void*>(kernel), occupancy, current_device());
  // Four lanes a scale block, up to a full wave (then a grid-stride loop); at
  // least one CTA, which also writes g * g_b.
  const int64_t want = (4 * static_cast<int64_t>(p.blocks) + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, cap)));
  const cudaError_t err = launch_dependent_if(programmatic, kernel, dim3(blocks), dim3(kThreads), 0, stream, p);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxfp4 quantize_decoded launch: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

ffi::Error launch_quantize_decoded(cudaStream_t stream, InputType type, const QuantizeParams& p, bool programmatic) {
  switch (type) {
    case kF32: return launch_quantize_decoded_as<float>(stream, p, programmatic);
    case kBF16: return launch_quantize_decoded_as<__nv_bfloat16_raw>(stream, p, programmatic);
    default: return launch_quantize_decoded_as<__half>(stream, p, programmatic);
  }
}

ffi::Error launch_quantize(cudaStream_t stream, InputType type, int32_t sf_layout, const QuantizeParams& p) {
  switch (type) {
    case kF32: return launch_quantize_layout<float>(stream, sf_layout, p);
    case kBF16: return launch_quantize_layout<__nv_bfloat16_raw>(stream, sf_layout, p);
    default: return launch_quantize_layout<__half>(stream, sf_layout, p);
  }
}

template <typename T>
ffi::Error launch_amax(cudaStream_t stream, const void* x, float* g, int64_t batch,
                       int64_t units_per_batch) {
  const int dev = current_device();
  // A cooperative grid must be co-resident: never more than occupancy allows.
  static std::atomic<int> occupancy[kMaxDevices];
  const int per_sm = resident_ctas(reinterpret_cast<const void*>(amax_kernel<T>), kAmaxThreads, 0, occupancy, dev);
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
  if (auto err = prepare("jaxfp4_quantize", x, gd.begin(), static_cast<int64_t>(gd.size()), &*data, &*scales,
                         nullptr, sf_layout, &p, &type);
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
  if (auto err = prepare("jaxfp4_quantize_dynamic", x, nullptr, 0, &*data, &*scales, nullptr, sf_layout, &p, &type);
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
    case kF32: err = launch_amax<float>(stream, p.x, gp, p.batch, units_per_batch); break;
    case kBF16: err = launch_amax<__nv_bfloat16_raw>(stream, p.x, gp, p.batch, units_per_batch); break;
    case kF16: err = launch_amax<__half>(stream, p.x, gp, p.batch, units_per_batch); break;
  }
  if (err.failure()) return err;
  return launch_quantize(stream, type, sf_layout, p);
}

}  // namespace

ffi::Error run_quantize_decoded(cudaStream_t stream, const ffi::AnyBuffer& x, const ffi::AnyBuffer& g,
                                const ffi::AnyBuffer& g_b, ffi::AnyBuffer out, ffi::AnyBuffer g_ab, bool programmatic) {
  if (g.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("jaxfp4_quantize_decoded: g must be F32");
  }
  const auto gbd = g_b.dimensions(), gad = g_ab.dimensions(), gd = g.dimensions();
  bool same = g_b.element_type() == ffi::DataType::F32 && g_ab.element_type() == ffi::DataType::F32 &&
              gbd.size() == gd.size() && gad.size() == gd.size();
  for (size_t i = 0; same && i < gd.size(); ++i) same = gbd[i] == gd[i] && gad[i] == gd[i];
  if (!same) {
    return ffi::Error::InvalidArgument("jaxfp4_quantize_decoded: g_b and the result g * g_b must be F32 of g's shape " +
                                       dims_str(gd));
  }
  QuantizeParams p{};
  InputType type;
  if (auto err = prepare("jaxfp4_quantize_decoded", x, gd.begin(), static_cast<int64_t>(gd.size()), nullptr, nullptr,
                         &out, 0, &p, &type);
      err.failure()) {
    return err;
  }
  if (!aligned(g.untyped_data(), 4) || !aligned(g_b.untyped_data(), 4) || !aligned(g_ab.untyped_data(), 4)) {
    return ffi::Error::InvalidArgument("jaxfp4_quantize_decoded: g, g_b and g * g_b must be 4-byte aligned");
  }
  p.g = static_cast<const float*>(g.untyped_data());
  p.g_b = static_cast<const float*>(g_b.untyped_data());
  p.g_ab = static_cast<float*>(g_ab.untyped_data());
  p.g_count = static_cast<int64_t>(g.element_count());
  record_kernel("quantize", "sm90_quantize_decoded");  // after validation: a rejected call ran nothing
  return launch_quantize_decoded(stream, type, p, programmatic);
}

namespace {

ffi::Error QuantizeDecodedImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer g_b,
                               ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> g_ab) {
  return run_quantize_decoded(stream, x, g, g_b, *out, *g_ab, true);
}

}  // namespace
}  // namespace jaxfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4QuantizeDecodedCuda, jaxfp4::QuantizeDecodedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x [*L, M, K]
                                  .Arg<ffi::AnyBuffer>()  // g [*L] F32
                                  .Arg<ffi::AnyBuffer>()  // g_b, g's shape, F32
                                  .Ret<ffi::AnyBuffer>()  // BF16 [*L, M, K]: e2m1(q) * SF
                                  .Ret<ffi::AnyBuffer>(),  // g * g_b
                              {ffi::Traits::kCmdBufferCompatible});

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
