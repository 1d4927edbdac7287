// CPU FFI handlers: NVFP4 quantize (static and dynamic global scale) and
// dequantize, nvfp4-spec.md section 2 bit for bit (also the host reference the
// CUDA quantize kernels are checked against: benchmarks/kernel/quantize_driver.cu).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "jaxfp4/format.h"
#include "jaxfp4/registry.h"
#include "xla/ffi/api/ffi.h"

namespace jaxfp4::cpu {
namespace {

// Quantizes one batch entry x[M, K] (already loaded row by row from `x`) with
// decode scale g into q[M, K/2] and its scale array (zeroed first, so every
// padded entry is 0x00).
void quantize_entry(const void* x, ffi::DataType xt, int64_t x_off, int64_t M, int64_t K, float g,
                    SfLayout layout, uint8_t* q, uint8_t* sf, int64_t sf_size, float* row) {
  const int64_t C = K / kBlock;
  std::memset(sf, 0, static_cast<size_t>(sf_size));
  const float gs = 1.0f / g;
  for (int64_t m = 0; m < M; ++m) {
    load_floats(x, xt, x_off + m * K, K, row);
    uint8_t* qr = q + m * (K / 2);
    for (int64_t c = 0; c < C; ++c) {
      const float* b = row + c * kBlock;
      float vmax = 0.0f;
      for (int i = 0; i < kBlock; ++i) vmax = nan_max_abs(vmax, b[i]);
      const uint8_t s = block_scale(vmax, gs);
      const float os = block_output_scale(s, gs);
      sf[sf_offset(layout, m, c, C)] = s;
      uint8_t* qb = qr + c * (kBlock / 2);
      for (int j = 0; j < kBlock / 2; ++j)
        qb[j] = static_cast<uint8_t>(e2m1_encode(b[2 * j] * os) | (e2m1_encode(b[2 * j + 1] * os) << 4));
    }
  }
}

// Every quantize handler's input: x [*L, M, K] float, K % 16 == 0.
ffi::Error check_x(const ffi::AnyBuffer& x) {
  if (auto e = check_rank(x, "x", 2); e.failure()) return e;
  if (!is_float_dtype(x.element_type())) return ffi::Error::InvalidArgument("x must be float32, bfloat16 or float16");
  const int64_t K = x.dimensions().back();
  if (K % kBlock != 0)
    return ffi::Error::InvalidArgument("the last axis of x (K = " + std::to_string(K) + ") must be a multiple of 16");
  return ffi::Error::Success();
}

// Shared checks of quantize / quantize_dynamic: x (check_x), data U8
// [*L, M, K/2], scales [*L, Rp, Cp].
ffi::Error check_quantize_args(const ffi::AnyBuffer& x, const ffi::AnyBuffer& data, const ffi::AnyBuffer& scales,
                               SfLayout layout) {
  if (auto e = check_x(x); e.failure()) return e;
  const Dims d = x.dimensions();
  const int nl = static_cast<int>(d.size()) - 2;
  const int64_t M = d[nl], K = d[nl + 1];
  if (auto e = check_buffer(data, "data", ffi::DataType::U8, d.begin(), nl, M, K / 2); e.failure()) return e;
  return check_scales(scales, "scales", layout, d.begin(), nl, M, K / kBlock);
}

ffi::Error quantize_impl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> data,
                         ffi::Result<ffi::AnyBuffer> scales, int32_t sf_layout) {
  record_kernel("quantize", "cpu");
  SfLayout layout;
  if (auto e = parse_layout(sf_layout, "sf_layout", &layout); e.failure()) return e;
  if (auto e = check_quantize_args(x, *data, *scales, layout); e.failure()) return e;
  const Dims d = x.dimensions();
  const int nl = static_cast<int>(d.size()) - 2;
  BatchMap gmap;
  if (auto e = check_global_scale(g, "g", d.begin(), nl, &gmap); e.failure()) return e;
  const int64_t L = prod(d.begin(), nl), M = d[nl], K = d[nl + 1];
  const int64_t sf_size = sf_rows(layout, M) * sf_cols(layout, K / kBlock);
  const float* gp = static_cast<const float*>(g.untyped_data());
  uint8_t* q = static_cast<uint8_t*>(data->untyped_data());
  uint8_t* sf = static_cast<uint8_t*>(scales->untyped_data());
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t i = 0; i < L; ++i)
    quantize_entry(x.untyped_data(), x.element_type(), i * M * K, M, K, gp[gmap.a_index(i)], layout,
                   q + i * M * (K / 2), sf + i * sf_size, sf_size, row.data());
  return ffi::Error::Success();
}

ffi::Error quantize_dynamic_impl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                                 ffi::Result<ffi::AnyBuffer> scales, ffi::Result<ffi::AnyBuffer> g_out,
                                 int32_t sf_layout) {
  record_kernel("quantize", "cpu");
  SfLayout layout;
  if (auto e = parse_layout(sf_layout, "sf_layout", &layout); e.failure()) return e;
  if (auto e = check_quantize_args(x, *data, *scales, layout); e.failure()) return e;
  const Dims d = x.dimensions();
  const int nl = static_cast<int>(d.size()) - 2;
  const Dims gd = g_out->dimensions();
  bool g_ok = g_out->element_type() == ffi::DataType::F32 && static_cast<int>(gd.size()) == nl;
  for (int i = 0; g_ok && i < nl; ++i) g_ok = gd[i] == d[i];
  if (!g_ok) return ffi::Error::InvalidArgument("g (result) must be float32 of shape " + dims_str(d.first(nl)));
  const int64_t L = prod(d.begin(), nl), M = d[nl], K = d[nl + 1];
  const int64_t sf_size = sf_rows(layout, M) * sf_cols(layout, K / kBlock);
  float* gp = static_cast<float*>(g_out->untyped_data());
  uint8_t* q = static_cast<uint8_t*>(data->untyped_data());
  uint8_t* sf = static_cast<uint8_t*>(scales->untyped_data());
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t i = 0; i < L; ++i) {
    // amax over the FINITE |x| of this entry (NaN and Inf do not take part).
    float amax = 0.0f;
    for (int64_t m = 0; m < M; ++m) {
      load_floats(x.untyped_data(), x.element_type(), (i * M + m) * K, K, row.data());
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::fabs(row[k]);
        if (std::isfinite(a) && a > amax) amax = a;
      }
    }
    const float g = amax == 0.0f ? 1.0f : amax / 2688.0f;
    gp[i] = g;
    quantize_entry(x.untyped_data(), x.element_type(), i * M * K, M, K, g, layout, q + i * M * (K / 2),
                   sf + i * sf_size, sf_size, row.data());
  }
  return ffi::Error::Success();
}

// The values quantize(x, g) stands for without g: bf16(e2m1(q) * SF), exact,
// and g * g_b: the W4A16 operands of gemm's decoded W4A4 route (linear scales
// internally, their order is moot).
ffi::Error quantize_decoded_impl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::AnyBuffer g_b,
                                 ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> g_ab) {
  record_kernel("quantize", "cpu");
  if (auto e = check_x(x); e.failure()) return e;
  const Dims d = x.dimensions();
  const int nl = static_cast<int>(d.size()) - 2;
  const int64_t M = d[nl], K = d[nl + 1];
  if (auto e = check_buffer(*out, "out", ffi::DataType::BF16, d.begin(), nl, M, K); e.failure()) return e;
  BatchMap gmap;
  if (auto e = check_global_scale(g, "g", d.begin(), nl, &gmap); e.failure()) return e;
  const Dims gd = g.dimensions();
  const int gr = static_cast<int>(gd.size());
  for (const ffi::AnyBuffer* b : {&g_b, &*g_ab}) {  // float32 of g's shape
    const Dims bd = b->dimensions();
    bool same = b->element_type() == ffi::DataType::F32 && bd.size() == gd.size();
    for (int i = 0; same && i < gr; ++i) same = bd[i] == gd[i];
    if (!same)
      return ffi::Error::InvalidArgument(std::string(b == &g_b ? "g_b" : "g * g_b") + " must be float32 of g's shape " +
                                         dims_str(gd));
  }
  const int64_t L = prod(d.begin(), nl), C = K / kBlock;
  const float* gp = static_cast<const float*>(g.untyped_data());
  const float* gbp = static_cast<const float*>(g_b.untyped_data());
  float* gab = static_cast<float*>(g_ab->untyped_data());
  for (int64_t i = 0; i < prod(gd.begin(), gr); ++i) gab[i] = gp[i] * gbp[i];
  std::vector<uint8_t> q(static_cast<size_t>(M * (K / 2))), sf(static_cast<size_t>(M * C));
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t i = 0; i < L; ++i) {
    quantize_entry(x.untyped_data(), x.element_type(), i * M * K, M, K, gp[gmap.a_index(i)], SfLayout::kLinear,
                   q.data(), sf.data(), M * C, row.data());
    for (int64_t m = 0; m < M; ++m) {
      decode_row(q.data() + m * (K / 2), sf.data(), SfLayout::kLinear, m, C, row.data());  // e2m1 * SF, exact
      store_floats(row.data(), 1.0f, K, out->untyped_data(), ffi::DataType::BF16, (i * M + m) * K);
    }
  }
  return ffi::Error::Success();
}

ffi::Error dequantize_impl(ffi::AnyBuffer data, ffi::AnyBuffer scales, ffi::AnyBuffer g,
                           ffi::Result<ffi::AnyBuffer> out, int32_t sf_layout) {
  record_kernel("dequantize", "cpu");
  SfLayout layout;
  if (auto e = parse_layout(sf_layout, "sf_layout", &layout); e.failure()) return e;
  if (auto e = check_rank(data, "data", 2); e.failure()) return e;
  const Dims d = data.dimensions();
  const int nl = static_cast<int>(d.size()) - 2;
  const int64_t M = d[nl], K = 2 * d[nl + 1];
  if (K % kBlock != 0)
    return ffi::Error::InvalidArgument("the last axis of data (K/2 = " + std::to_string(K / 2) +
                                       ") must be a multiple of 8");
  if (auto e = check_buffer(data, "data", ffi::DataType::U8, d.begin(), nl, M, K / 2); e.failure()) return e;
  if (auto e = check_scales(scales, "scales", layout, d.begin(), nl, M, K / kBlock); e.failure()) return e;
  BatchMap gmap;
  if (auto e = check_global_scale(g, "g", d.begin(), nl, &gmap); e.failure()) return e;
  if (!is_float_dtype(out->element_type()))
    return ffi::Error::InvalidArgument("the output must be float32, bfloat16 or float16");
  if (auto e = check_buffer(*out, "out", out->element_type(), d.begin(), nl, M, K); e.failure()) return e;
  const int64_t L = prod(d.begin(), nl), C = K / kBlock;
  const int64_t sf_size = sf_rows(layout, M) * sf_cols(layout, C);
  const uint8_t* q = static_cast<const uint8_t*>(data.untyped_data());
  const uint8_t* sf = static_cast<const uint8_t*>(scales.untyped_data());
  const float* gp = static_cast<const float*>(g.untyped_data());
  std::vector<float> row(static_cast<size_t>(K));
  for (int64_t i = 0; i < L; ++i) {
    const float gi = gp[gmap.a_index(i)];
    for (int64_t m = 0; m < M; ++m) {
      decode_row(q + (i * M + m) * (K / 2), sf + i * sf_size, layout, m, C, row.data());  // e2m1 * SF, exact
      store_floats(row.data(), gi, K, out->untyped_data(), out->element_type(), (i * M + m) * K);
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxfp4::cpu

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4CpuQuantize, jaxfp4::cpu::quantize_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Ret<ffi::AnyBuffer>()  // data
                                  .Ret<ffi::AnyBuffer>()  // scales
                                  .Attr<int32_t>("sf_layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4CpuQuantizeDynamic, jaxfp4::cpu::quantize_dynamic_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Ret<ffi::AnyBuffer>()  // data
                                  .Ret<ffi::AnyBuffer>()  // scales
                                  .Ret<ffi::AnyBuffer>()  // g
                                  .Attr<int32_t>("sf_layout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4CpuQuantizeDecoded, jaxfp4::cpu::quantize_decoded_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // g
                                  .Arg<ffi::AnyBuffer>()   // g_b
                                  .Ret<ffi::AnyBuffer>()   // out BF16
                                  .Ret<ffi::AnyBuffer>());  // g * g_b

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4CpuDequantize, jaxfp4::cpu::dequantize_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // data
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int32_t>("sf_layout"));
