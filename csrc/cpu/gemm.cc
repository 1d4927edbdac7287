// CPU FFI handlers: NVFP4 GEMMs (nvfp4-spec.md section 4), out = A @ B.T with
// K-major operands. W4A4: both operands NVFP4; W4A16: A in F32/BF16/F16.
// Each operand row is decoded to float32 once per tile (e2m1 * SF, exact),
// the dot products accumulate in float32, and the result is scaled by the
// global scales and rounded once to the output dtype.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "jaxfp4/batch.h"
#include "jaxfp4/format.h"
#include "jaxfp4/registry.h"
#include "xla/ffi/api/ffi.h"

namespace jaxfp4::cpu {
namespace {

constexpr int64_t kTileM = 64;  // rows of A decoded at a time
constexpr int64_t kTileN = 64;  // rows of B decoded at a time

// float32 dot product of two length-K rows (K % 16 == 0), 16 partial sums.
inline float dot(const float* a, const float* b, int64_t K) {
  float acc[kBlock] = {};
  for (int64_t k = 0; k < K; k += kBlock)
    for (int j = 0; j < kBlock; ++j) acc[j] += a[k + j] * b[k + j];
  for (int w = kBlock / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// One NVFP4 operand: data U8 [*L, R, K/2], scales [*L, Rp, Cp], g F32 [*L].
struct Nvfp4 {
  const uint8_t* q = nullptr;
  const uint8_t* sf = nullptr;
  const float* g = nullptr;
  SfLayout layout = SfLayout::kLinear;
  int64_t R = 0, K = 0, sf_size = 0;
  BatchMap gmap;  // flat batch index of this operand -> flat index into g

  // dst[r * K + k] = e2m1 * SF for rows r0 .. r0 + n of batch entry `entry`.
  void decode_rows(int64_t entry, int64_t r0, int64_t n, float* dst) const {
    const uint8_t* sfe = sf + entry * sf_size;
    for (int64_t r = 0; r < n; ++r)
      decode_row(q + (entry * R + r0 + r) * (K / 2), sfe, layout, r0 + r, K / kBlock, dst + r * K);
  }
  float global(int64_t entry) const { return g[gmap.a_index(entry)]; }
};

// Checks data [*lead, R, K/2] (R and K taken from data), its scales and g.
ffi::Error check_nvfp4(const ffi::AnyBuffer& data, const ffi::AnyBuffer& scales, const ffi::AnyBuffer& g,
                       int32_t layout_attr, const char* prefix, Nvfp4* op) {
  const std::string p(prefix);
  if (auto e = parse_layout(layout_attr, (p + "_sf_layout").c_str(), &op->layout); e.failure()) return e;
  if (auto e = check_rank(data, (p + "_data").c_str(), 2); e.failure()) return e;
  const Dims d = data.dimensions();
  const int nl = static_cast<int>(d.size()) - 2;
  op->R = d[nl];
  op->K = 2 * d[nl + 1];
  if (op->K % kBlock != 0)
    return ffi::Error::InvalidArgument("the last axis of " + p + "_data (K/2 = " + std::to_string(d[nl + 1]) +
                                       ") must be a multiple of 8");
  if (auto e = check_buffer(data, (p + "_data").c_str(), ffi::DataType::U8, d.begin(), nl, op->R, op->K / 2);
      e.failure())
    return e;
  if (auto e = check_scales(scales, (p + "_scales").c_str(), op->layout, d.begin(), nl, op->R, op->K / kBlock);
      e.failure())
    return e;
  if (auto e = check_global_scale(g, (p + "_g").c_str(), d.begin(), nl, &op->gmap); e.failure()) return e;
  op->q = static_cast<const uint8_t*>(data.untyped_data());
  op->sf = static_cast<const uint8_t*>(scales.untyped_data());
  op->g = static_cast<const float*>(g.untyped_data());
  op->sf_size = sf_rows(op->layout, op->R) * sf_cols(op->layout, op->K / kBlock);
  return ffi::Error::Success();
}

// Checks the batch axes of A (a_dims) and B (b_dims) and the output
// [*L, M, N]; on success *map broadcasts them and *empty says the output has
// no elements (nothing to compute).
ffi::Error check_gemm_shapes(Dims a_dims, Dims b_dims, int64_t M, int64_t N, const ffi::AnyBuffer& out,
                             BatchMap* map, bool* empty) {
  if (a_dims.size() != b_dims.size())
    return ffi::Error::InvalidArgument("A " + dims_str(a_dims) + " and B " + dims_str(b_dims) +
                                       " must have the same number of leading batch axes");
  const int nl = static_cast<int>(a_dims.size()) - 2;
  int64_t lead[kMaxBatchRank];
  for (int i = 0; i < nl; ++i) {
    const int64_t a = a_dims[i], b = b_dims[i];
    if (a != b && a != 1 && b != 1)
      return ffi::Error::InvalidArgument("batch axes of A " + dims_str(a_dims) + " and B " + dims_str(b_dims) +
                                         " do not broadcast");
    lead[i] = a == 1 ? b : a;  // numpy rules: 1 broadcasts, also against 0
  }
  if (!is_float_dtype(out.element_type()))
    return ffi::Error::InvalidArgument("the output must be float32, bfloat16 or float16");
  if (auto e = check_buffer(out, "out", out.element_type(), lead, nl, M, N); e.failure()) return e;
  *empty = prod(lead, nl) == 0 || M == 0 || N == 0;
  if (!*empty && !make_batch_map(a_dims.begin(), b_dims.begin(), nl, map))
    return ffi::Error::InvalidArgument("batch axes of A and B do not broadcast");
  return ffi::Error::Success();
}

// out[i] = scale(i) * A[a(i)] @ B[b(i)].T for every output batch entry i;
// load_a(entry, m0, n, dst) writes rows m0 .. m0 + n of A's entry as float32.
template <class LoadA, class Scale>
void gemm(const BatchMap& map, int64_t M, int64_t N, int64_t K, LoadA load_a, Scale scale, const Nvfp4& b,
          ffi::AnyBuffer& out) {
  const size_t k = static_cast<size_t>(std::max<int64_t>(K, 1));
  std::vector<float> abuf(static_cast<size_t>(kTileM) * k), bbuf(static_cast<size_t>(kTileN) * k),
      obuf(static_cast<size_t>(kTileN));
  for (int64_t i = 0; i < map.count; ++i) {
    const int64_t ai = map.a_index(i), bi = map.b_index(i);
    const float s = scale(ai, bi);
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
      const int64_t mt = std::min(kTileM, M - m0);
      load_a(ai, m0, mt, abuf.data());
      for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
        const int64_t nt = std::min(kTileN, N - n0);
        b.decode_rows(bi, n0, nt, bbuf.data());
        for (int64_t m = 0; m < mt; ++m) {
          const float* ar = abuf.data() + m * K;
          for (int64_t n = 0; n < nt; ++n) obuf[n] = dot(ar, bbuf.data() + n * K, K);
          store_floats(obuf.data(), s, nt, out.untyped_data(), out.element_type(), (i * M + m0 + m) * N + n0);
        }
      }
    }
  }
}

ffi::Error check_b_packing(int32_t b_packing) {
  if (b_packing != 0)
    return ffi::Error::InvalidArgument("CPU handlers take unpacked weights (b_packing must be 0, got " +
                                       std::to_string(b_packing) + ")");
  return ffi::Error::Success();
}

ffi::Error gemm_w4a4_impl(ffi::AnyBuffer a_data, ffi::AnyBuffer a_scales, ffi::AnyBuffer a_g, ffi::AnyBuffer b_data,
                          ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g, ffi::Result<ffi::AnyBuffer> out,
                          int32_t a_sf_layout, int32_t b_sf_layout, int32_t b_packing) {
  record_kernel("gemm", "cpu");
  if (auto e = check_b_packing(b_packing); e.failure()) return e;
  Nvfp4 a, b;
  if (auto e = check_nvfp4(a_data, a_scales, a_g, a_sf_layout, "a", &a); e.failure()) return e;
  if (auto e = check_nvfp4(b_data, b_scales, b_g, b_sf_layout, "b", &b); e.failure()) return e;
  if (a.K != b.K)
    return ffi::Error::InvalidArgument("A has K = " + std::to_string(a.K) + " but B has K = " + std::to_string(b.K));
  BatchMap map;
  bool empty = false;
  if (auto e = check_gemm_shapes(a_data.dimensions(), b_data.dimensions(), a.R, b.R, *out, &map, &empty);
      e.failure())
    return e;
  if (empty) return ffi::Error::Success();
  gemm(
      map, a.R, b.R, a.K,
      [&](int64_t entry, int64_t m0, int64_t n, float* dst) { a.decode_rows(entry, m0, n, dst); },
      [&](int64_t ai, int64_t bi) { return a.global(ai) * b.global(bi); }, b, *out);
  return ffi::Error::Success();
}

ffi::Error gemm_w4a16_impl(ffi::AnyBuffer a, ffi::AnyBuffer b_data, ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g,
                           ffi::Result<ffi::AnyBuffer> out, int32_t b_sf_layout, int32_t b_packing) {
  record_kernel("gemm", "cpu");
  if (auto e = check_b_packing(b_packing); e.failure()) return e;
  if (auto e = check_rank(a, "a", 2); e.failure()) return e;
  if (!is_float_dtype(a.element_type())) return ffi::Error::InvalidArgument("a must be float32, bfloat16 or float16");
  Nvfp4 b;
  if (auto e = check_nvfp4(b_data, b_scales, b_g, b_sf_layout, "b", &b); e.failure()) return e;
  const Dims ad = a.dimensions();
  const int64_t M = ad[ad.size() - 2], K = ad[ad.size() - 1];
  if (K != b.K)
    return ffi::Error::InvalidArgument("a has K = " + std::to_string(K) + " but B has K = " + std::to_string(b.K));
  BatchMap map;
  bool empty = false;
  if (auto e = check_gemm_shapes(ad, b_data.dimensions(), M, b.R, *out, &map, &empty); e.failure()) return e;
  if (empty) return ffi::Error::Success();
  const void* ap = a.untyped_data();
  const ffi::DataType at = a.element_type();
  gemm(
      map, M, b.R, K,
      [&](int64_t entry, int64_t m0, int64_t n, float* dst) { load_floats(ap, at, (entry * M + m0) * K, n * K, dst); },
      [&](int64_t, int64_t bi) { return b.global(bi); }, b, *out);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxfp4::cpu

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4CpuGemmW4A4, jaxfp4::cpu::gemm_w4a4_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a_data
                                  .Arg<ffi::AnyBuffer>()  // a_scales
                                  .Arg<ffi::AnyBuffer>()  // a_g
                                  .Arg<ffi::AnyBuffer>()  // b_data
                                  .Arg<ffi::AnyBuffer>()  // b_scales
                                  .Arg<ffi::AnyBuffer>()  // b_g
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int32_t>("a_sf_layout")
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4CpuGemmW4A16, jaxfp4::cpu::gemm_w4a16_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b_data
                                  .Arg<ffi::AnyBuffer>()  // b_scales
                                  .Arg<ffi::AnyBuffer>()  // b_g
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"));
