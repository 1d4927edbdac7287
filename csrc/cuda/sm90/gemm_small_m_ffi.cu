// The FFI handlers of the small-M GEMM family (csrc/README.md's table:
// jaxfp4_gemm_w4a16, _w4a4, _w4a4_quantize_a, _w4a4_decoded, _fused, _chain):
// each validates its buffers and attributes into a Launch (gemm_small_m.h)
// and ends with finish(). Errors are InvalidArgument naming the operand and
// the rule; nothing is launched for an invalid call, and no handler
// synchronises with the host (all are command-buffer compatible).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "jaxfp4/batch.h"
#include "jaxfp4/ffi_checks.h"
#include "jaxfp4/format.h"
#include "gemm_small_m.h"
#include "quantize_decoded.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxfp4 {
namespace sm90_gemm {

using Dims = ffi::Span<const int64_t>;

bool parse_layout(int32_t v, SfLayout* out) {
  if (v < 0 || v > 2) return false;
  *out = static_cast<SfLayout>(v);
  return true;
}

// check_buffer (jaxfp4/ffi_checks.h), its message prefixed like every error here.
ffi::Error expect(const ffi::AnyBuffer& buf, const char* name, ffi::DataType dt, const int64_t* lead, int nl,
                  int64_t r, int64_t c) {
  const ffi::Error e = check_buffer(buf, name, dt, lead, nl, r, c);
  return e.failure() ? bad(e.message()) : e;
}

// Validates the weight operand (b_data, b_scales, b_g) given N, K and the
// batch rank nl; fills the b fields of L.
ffi::Error check_weights(const ffi::AnyBuffer& b_data, const ffi::AnyBuffer& b_scales, const ffi::AnyBuffer& b_g,
                         int32_t layout_attr, int32_t packing, int nl, int64_t N, int64_t K, Launch* L,
                         int64_t* b_lead) {
  SfLayout layout;
  if (!parse_layout(layout_attr, &layout)) return bad("b_sf_layout must be 0, 1 or 2");
  if (packing != 0 && packing != 1) return bad("b_packing must be 0 (plain) or 1 (sm90)");
  const Dims gd = b_g.dimensions();
  if (b_g.element_type() != ffi::DataType::F32 || static_cast<int>(gd.size()) != nl)
    return bad("b_g must be F32 with one entry per leading batch index, got " + dims_str(gd));
  for (int i = 0; i < nl; ++i) b_lead[i] = gd[i];
  const int64_t C = K / 16;
  if (packing == 0) {
    if (auto e = expect(b_data, "b_data", ffi::DataType::U8, b_lead, nl, N, K / 2); e.failure()) return e;
    if (auto e = expect(b_scales, "b_scales", ffi::DataType::F8E4M3FN, b_lead, nl, sf_rows(layout, N),
                        sf_cols(layout, C));
        e.failure())
      return e;
    L->p.b_stride = N * (K / 2);
    L->p.b_sf_stride = sf_rows(layout, N) * sf_cols(layout, C);
    L->p.b_sf_cstride = sf_offset(layout, 0, 4, C) - sf_offset(layout, 0, 0, C);
  } else {
    const int64_t T = (N + 15) / 16, Kp = (K + kChunk - 1) / kChunk * kChunk;
    if (auto e = expect(b_data, "b_data (sm90-packed)", ffi::DataType::U8, b_lead, nl, T, 8 * Kp); e.failure())
      return e;
    if (auto e = expect(b_scales, "b_scales (sm90-packed)", ffi::DataType::F8E4M3FN, b_lead, nl, T, Kp);
        e.failure())
      return e;
    L->p.b_stride = T * 8 * Kp;
    L->p.b_sf_stride = T * Kp;
    L->p.b_sf_cstride = 0;
  }
  const uintptr_t align = packing ? 16 : 8;
  if (reinterpret_cast<uintptr_t>(b_data.untyped_data()) % align != 0) return bad("b_data is misaligned");
  if (packing && reinterpret_cast<uintptr_t>(b_scales.untyped_data()) % 16 != 0)
    return bad("b_scales is misaligned");
  L->packed = packing == 1;
  L->p.b = static_cast<const uint8_t*>(b_data.untyped_data());
  L->p.b_sf = static_cast<const uint8_t*>(b_scales.untyped_data());
  L->p.b_g = static_cast<const float*>(b_g.untyped_data());
  L->p.b_sf_layout = layout_attr;
  return ffi::Error::Success();
}

// Validates out [*L, M, N] against the batch map; fills out fields.
ffi::Error check_out(const ffi::AnyBuffer& out, int nl, int64_t M, const BatchMap& map, Launch* L) {
  const Dims d = out.dimensions();
  if (static_cast<int>(d.size()) != nl + 2 || d[nl] != M) return bad("out has shape " + dims_str(d));
  for (int i = 0; i < nl; ++i)
    if (d[i] != map.out_dims[i]) return bad("out's batch axes " + dims_str(d) + " do not match the operands'");
  switch (out.element_type()) {
    case ffi::DataType::F32: L->p.out_type = kOutF32; break;
    case ffi::DataType::BF16: L->p.out_type = kOutBF16; break;
    case ffi::DataType::F16: L->p.out_type = kOutF16; break;
    default: return bad("out must be F32, BF16 or F16");
  }
  L->p.out = out.untyped_data();
  L->batch = map.count;
  return ffi::Error::Success();
}

// Validates the weights and out against a's dims `ad` (nl batch axes, M rows,
// K), N taken from out (n_per_out weight rows per output column: 2 for the
// SwiGLU epilogue) or given (n_gemm > 0: the rotary epilogue, whose out holds
// the q heads only); fills L's weight, out and batch-map fields.
ffi::Error check_b_and_out(Dims ad, int nl, int64_t M, int64_t K, const ffi::AnyBuffer& b_data,
                           const ffi::AnyBuffer& b_scales, const ffi::AnyBuffer& b_g, int32_t b_sf_layout,
                           int32_t b_packing, const ffi::AnyBuffer& out, Launch* L, int64_t* N,
                           int64_t n_per_out = 1, int64_t n_gemm = 0) {
  const Dims od = out.dimensions();
  if (static_cast<int>(od.size()) != nl + 2) return bad("out must have the rank of a");
  *N = n_gemm > 0 ? n_gemm : od[nl + 1] * n_per_out;
  int64_t b_lead[kMaxBatchRank] = {};
  if (auto e = check_weights(b_data, b_scales, b_g, b_sf_layout, b_packing, nl, *N, K, L, b_lead); e.failure())
    return e;
  BatchMap map;
  if (!make_batch_map(ad.begin(), b_lead, nl, &map)) return bad("the batch axes of a and b do not broadcast");
  if (auto e = check_out(out, nl, M, map, L); e.failure()) return e;
  L->p.map = map;
  return ffi::Error::Success();
}

// The dims of a 16-bit activation operand a [*La, M, K]: its batch rank, M and K.
ffi::Error act_dims(Dims ad, int* nl, int64_t* M, int64_t* K) {
  if (ad.size() < 2) return bad("a must have rank >= 2 ([*L, M, K])");
  *nl = static_cast<int>(ad.size()) - 2;
  if (*nl > kMaxBatchRank) return bad("too many batch axes");
  *M = ad[*nl];
  *K = ad[*nl + 1];
  if (*K % 16 != 0) return bad("K must be a multiple of 16");
  return ffi::Error::Success();
}

// The 16-bit activation fields of L (no activation scales).
void set_act(const ffi::AnyBuffer& a, int64_t M, int64_t K, const float* a_g, Launch* L) {
  L->p.a = a.untyped_data();
  L->p.a_stride = M * K;
  L->p.a_sf = nullptr;
  L->p.a_g = a_g;
}

// a_g: F32 with a's batch dims.
ffi::Error check_a_g(const ffi::AnyBuffer& a_g, Dims ad, int nl) {
  const Dims gd = a_g.dimensions();
  bool ok = a_g.element_type() == ffi::DataType::F32 && static_cast<int>(gd.size()) == nl;
  for (int i = 0; ok && i < nl; ++i) ok = gd[i] == ad[i];
  return ok ? ffi::Error::Success() : bad("a_g must be F32 [*La], got " + dims_str(gd));
}


ffi::Error GemmW4A16Impl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b_data, ffi::AnyBuffer b_scales,
                         ffi::AnyBuffer b_g, ffi::Result<ffi::AnyBuffer> out, int32_t b_sf_layout,
                         int32_t b_packing) {
  Launch L;
  const Dims ad = a.dimensions();
  int nl = 0;
  int64_t M = 0, K = 0, N = 0;
  if (auto e = act_dims(ad, &nl, &M, &K); e.failure()) return e;
  if (a.element_type() == ffi::DataType::BF16) {
    L.f16 = false;
  } else if (a.element_type() == ffi::DataType::F16) {
    L.f16 = true;
  } else {
    return bad("a must be BF16 or F16 on CUDA");
  }
  if (reinterpret_cast<uintptr_t>(a.untyped_data()) % 16 != 0) return bad("a is misaligned");
  if (auto e = check_b_and_out(ad, nl, M, K, b_data, b_scales, b_g, b_sf_layout, b_packing, *out, &L, &N);
      e.failure())
    return e;
  L.a4 = false;
  set_act(a, M, K, nullptr, &L);
  return finish(L, M, N, K, stream);
}

ffi::Error GemmW4A4Impl(cudaStream_t stream, ffi::AnyBuffer a_data, ffi::AnyBuffer a_scales, ffi::AnyBuffer a_g,
                        ffi::AnyBuffer b_data, ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g,
                        ffi::Result<ffi::AnyBuffer> out, int32_t a_sf_layout, int32_t b_sf_layout,
                        int32_t b_packing) {
  Launch L;
  const Dims ad = a_data.dimensions();
  if (ad.size() < 2) return bad("a_data must have rank >= 2 ([*L, M, K/2])");
  const int nl = static_cast<int>(ad.size()) - 2;
  if (nl > kMaxBatchRank) return bad("too many batch axes");
  const int64_t M = ad[nl], K = 2 * ad[nl + 1];
  if (K % 16 != 0) return bad("K must be a multiple of 16");
  SfLayout al;
  if (!parse_layout(a_sf_layout, &al)) return bad("a_sf_layout must be 0, 1 or 2");
  if (auto e = expect(a_data, "a_data", ffi::DataType::U8, ad.begin(), nl, M, K / 2); e.failure()) return e;
  if (auto e = expect(a_scales, "a_scales", ffi::DataType::F8E4M3FN, ad.begin(), nl, sf_rows(al, M),
                      sf_cols(al, K / 16));
      e.failure())
    return e;
  if (auto e = check_a_g(a_g, ad, nl); e.failure()) return e;
  if (reinterpret_cast<uintptr_t>(a_data.untyped_data()) % 8 != 0) return bad("a_data is misaligned");
  int64_t N = 0;
  if (auto e = check_b_and_out(ad, nl, M, K, b_data, b_scales, b_g, b_sf_layout, b_packing, *out, &L, &N);
      e.failure())
    return e;
  L.a4 = true;
  L.p.a = a_data.untyped_data();
  L.p.a_stride = M * (K / 2);
  L.p.a_sf = static_cast<const uint8_t*>(a_scales.untyped_data());
  L.p.a_sf_stride = sf_rows(al, M) * sf_cols(al, K / 16);
  L.p.a_sf_cstride = sf_offset(al, 0, 4, K / 16) - sf_offset(al, 0, 0, K / 16);
  L.p.a_sf_layout = a_sf_layout;
  L.p.a_g = static_cast<const float*>(a_g.untyped_data());
  return finish(L, M, N, K, stream);
}

// W4A4 with the activation quantization in the kernel: a [*La, M, K] BF16
// quantized with decode scale a_g [*La] (as jaxfp4.quantize(a, a_g)), then
// a @ b^T. For packed weights, M <= 8 and min(M, 8) * qa_row_bytes(K) <=
// kQaMaxBytes (jaxfp4's lowering checks the same before choosing it).
ffi::Error GemmW4A4QuantizeAImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer a_g, ffi::AnyBuffer b_data,
                                 ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g, ffi::Result<ffi::AnyBuffer> out,
                                 int32_t b_sf_layout, int32_t b_packing) {
  Launch L;
  const Dims ad = a.dimensions();
  int nl = 0;
  int64_t M = 0, K = 0, N = 0;
  if (auto e = act_dims(ad, &nl, &M, &K); e.failure()) return e;
  if (a.element_type() != ffi::DataType::BF16) return bad("a must be BF16 (in-kernel activation quantization)");
  if (b_packing != 1) return bad("in-kernel activation quantization needs sm90-packed weights (b_packing 1)");
  if (M > 8 || std::min<int64_t>(M, 8) * qa_row_bytes(K) > kQaMaxBytes)
    return bad("in-kernel activation quantization needs M <= 8 and M * (2 * (K rounded up to 64) + 16) <= " +
               std::to_string(kQaMaxBytes) + " bytes of shared memory");
  if (reinterpret_cast<uintptr_t>(a.untyped_data()) % 16 != 0) return bad("a is misaligned");
  if (auto e = check_a_g(a_g, ad, nl); e.failure()) return e;
  if (auto e = check_b_and_out(ad, nl, M, K, b_data, b_scales, b_g, b_sf_layout, b_packing, *out, &L, &N);
      e.failure())
    return e;
  L.qa = true;
  set_act(a, M, K, static_cast<const float*>(a_g.untyped_data()), &L);
  return finish(L, M, N, K, stream);
}

// A rotary link's buffers (kEpilogueRotaryKV, jaxfp4_gemm_chain only): cos, sin
// F32 [M, D/2], slot S32 [M] and the caches, as operands (k_in, v_in) and as the
// results aliased to them (k_out, v_out); heads: the query heads.
struct RotaryBuffers {
  const ffi::AnyBuffer *cos, *sin, *slot, *k_in, *v_in, *k_out, *v_out;
  int32_t heads;
};

// Validates the rotary epilogue's buffers against M and the output; fills L's
// rotary fields and *n_gemm (the weight's rows, (heads + 2 kv_heads) * D).
ffi::Error check_rotary(const RotaryBuffers& r, int64_t M, const ffi::AnyBuffer& out, Launch* L, int64_t* n_gemm) {
  const Dims kd = r.k_out->dimensions();
  if (kd.size() != 4 || r.k_out->element_type() != ffi::DataType::BF16)
    return bad("the rotary epilogue's k_cache must be BF16 [B, T, kv_heads, head_dim], got " + dims_str(kd));
  for (const ffi::AnyBuffer* c : {r.v_out, r.k_in, r.v_in}) {
    const Dims cd = c->dimensions();
    if (c->element_type() != ffi::DataType::BF16 || cd.size() != 4 || !std::equal(cd.begin(), cd.end(), kd.begin()))
      return bad("the rotary epilogue's caches (operands and results) must all be BF16 " + dims_str(kd) + ", got " +
                 dims_str(cd));
  }
  if (r.k_in->untyped_data() != r.k_out->untyped_data() || r.v_in->untyped_data() != r.v_out->untyped_data())
    return bad("the rotary epilogue's cache results must alias their operands (updated in place)");
  const int64_t rows = kd[0] * kd[1], kvh = kd[2], d = kd[3];
  if (d % 16 != 0 || d > 0x7FFF) return bad("the rotary epilogue needs head_dim % 16 == 0, got " + std::to_string(d));
  if (r.heads < 1) return bad("the rotary epilogue needs heads >= 1");
  if (rows > 0x7FFFFFFF || kvh > 0xFFFF) return bad("the rotary epilogue's cache is too large");
  if (auto e = expect(*r.cos, "cos", ffi::DataType::F32, nullptr, 0, M, d / 2); e.failure()) return e;
  if (auto e = expect(*r.sin, "sin", ffi::DataType::F32, nullptr, 0, M, d / 2); e.failure()) return e;
  const Dims sd = r.slot->dimensions();
  if (r.slot->element_type() != ffi::DataType::S32 || sd.size() != 1 || sd[0] != M)
    return bad("the rotary epilogue's slot must be S32 [M], got " + dims_str(sd));
  const Dims od = out.dimensions();
  if (od.size() != 2 || od[1] != r.heads * d)
    return bad("with the rotary epilogue out must be [M, heads * head_dim], got " + dims_str(od));
  *n_gemm = (r.heads + 2 * kvh) * d;
  L->p.rope_cos = static_cast<const float*>(r.cos->untyped_data());
  L->p.rope_sin = static_cast<const float*>(r.sin->untyped_data());
  L->p.kv_slot = static_cast<const int32_t*>(r.slot->untyped_data());
  L->p.k_cache = static_cast<__nv_bfloat16*>(r.k_out->untyped_data());
  L->p.v_cache = static_cast<__nv_bfloat16*>(r.v_out->untyped_data());
  L->p.heads = r.heads;
  L->p.kv_heads = static_cast<int32_t>(kvh);
  L->p.head_dim = static_cast<int32_t>(d);
  L->p.kv_rows = static_cast<int32_t>(rows);
  return ffi::Error::Success();
}

// Validates one fused GEMM and fills L (and M, N, K); launches nothing. The
// optional operands are null where unused (norm_w without prologue 1, a_g for
// W4A16, residual when there is none, rotary without kEpilogueRotaryKV).
ffi::Error prepare_fused(const ffi::AnyBuffer& a, const ffi::AnyBuffer* norm_w, const ffi::AnyBuffer* a_g,
                         const ffi::AnyBuffer& b_data, const ffi::AnyBuffer& b_scales, const ffi::AnyBuffer& b_g,
                         const ffi::AnyBuffer* residual, const ffi::AnyBuffer& out, int32_t prologue, float eps,
                         int32_t epilogue, int32_t b_sf_layout, int32_t b_packing, Launch* L, int64_t* M, int64_t* N,
                         int64_t* K, const RotaryBuffers* rotary = nullptr) {
  const Dims ad = a.dimensions();
  if (ad.size() != 2) return bad("a must have rank 2 ([M, K]; [M, 2K] for swiglu) in the fused GEMM");
  if (a.element_type() != ffi::DataType::BF16) return bad("a must be BF16 in the fused GEMM");
  if (prologue < kPrologueNone || prologue > kPrologueSwiGlu) return bad("prologue must be 0, 1 or 2");
  *M = ad[0];
  if (prologue == kPrologueSwiGlu && ad[1] % 2 != 0) return bad("swiglu needs a [M, 2K] (an even last dim)");
  *K = prologue == kPrologueSwiGlu ? ad[1] / 2 : ad[1];
  if (*K % 16 != 0) return bad("K must be a multiple of 16");
  const bool w4a4 = a_g != nullptr;
  if (w4a4 && (a_g->element_type() != ffi::DataType::F32 || a_g->dimensions().size() != 0))
    return bad("a_g must be an F32 scalar (W4A4) or empty (W4A16)");
  if (prologue != kPrologueNone || w4a4) {
    if (b_packing != 1) return bad("a fused prologue or W4A4 needs sm90-packed weights (b_packing 1)");
    if (*M > 8 || std::min<int64_t>(*M, 8) * qa_row_bytes(*K) > kQaMaxBytes)
      return bad("a fused prologue or W4A4 needs M <= 8 and M * (2 * (K rounded up to 64) + 16) <= " +
                 std::to_string(kQaMaxBytes) + " bytes of shared memory");
  }
  if (epilogue < kEpilogueNone || epilogue > kEpilogueRotaryKV) return bad("epilogue must be 0, 1 or 2");
  const bool swiglu_out = epilogue == kEpilogueSwiGluInterleaved;
  if (epilogue != kEpilogueNone) {
    const char* what = swiglu_out ? "the swiglu epilogue" : "the rotary epilogue";
    if (b_packing != 1) return bad(std::string(what) + " needs sm90-packed weights (b_packing 1)");
    if (residual != nullptr) return bad(std::string(what) + " takes no residual");
    if (out.element_type() != ffi::DataType::BF16) return bad(std::string("out must be BF16 with ") + what);
  }
  if ((epilogue == kEpilogueRotaryKV) != (rotary != nullptr))
    return bad("the rotary epilogue (2) runs as a jaxfp4_gemm_chain link with its cos, sin, slot and cache buffers");
  int64_t n_gemm = 0;
  if (rotary != nullptr)
    if (auto e = check_rotary(*rotary, *M, out, L, &n_gemm); e.failure()) return e;
  if (reinterpret_cast<uintptr_t>(a.untyped_data()) % 16 != 0) return bad("a is misaligned");
  const int64_t kd[2] = {*M, *K};
  if (auto e = check_b_and_out(Dims(kd, 2), 0, *M, *K, b_data, b_scales, b_g, b_sf_layout, b_packing, out, L, N,
                               swiglu_out ? 2 : 1, n_gemm);
      e.failure())
    return e;
  if (swiglu_out && *N % 16 != 0)
    return bad("the swiglu epilogue needs N % 16 == 0 (out [M, N/2]: gate and up rows interleaved by 8)");
  if (prologue == kPrologueRmsNorm) {
    if (norm_w == nullptr) return bad("rms_norm needs norm_w");
    const Dims wd = norm_w->dimensions();
    if (norm_w->element_type() != ffi::DataType::BF16 || wd.size() != 1 || wd[0] != *K)
      return bad("norm_w must be BF16 [K] for rms_norm, got " + dims_str(wd));
    if (reinterpret_cast<uintptr_t>(norm_w->untyped_data()) % 16 != 0) return bad("norm_w is misaligned");
    L->p.norm_w = static_cast<const __nv_bfloat16*>(norm_w->untyped_data());
  } else if (norm_w != nullptr) {
    return bad("norm_w must be empty without the rms_norm prologue");
  }
  if (residual != nullptr) {
    if (auto e = expect(*residual, "residual", ffi::DataType::BF16, nullptr, 0, *M, *N); e.failure()) return e;
    if (out.element_type() != ffi::DataType::BF16) return bad("out must be BF16 with a residual");
    L->p.residual = static_cast<const __nv_bfloat16*>(residual->untyped_data());
  }
  L->f16 = false;
  L->a4 = false;
  L->qa = w4a4 && prologue == kPrologueNone;
  L->p.prologue = prologue;
  L->p.eps = eps;
  L->p.epilogue = epilogue;
  set_act(a, *M, *K, w4a4 ? static_cast<const float*>(a_g->untyped_data()) : nullptr, L);
  return ffi::Error::Success();
}

// An empty operand stands for "unused".
const ffi::AnyBuffer* given(const ffi::AnyBuffer& x) { return x.element_count() != 0 ? &x : nullptr; }

// The GEMM with a decoder's neighbours fused in (one batch entry, bf16 a):
// out [M, N] = residual + prologue(a) @ b^T, each step rounded as the unfused
// ops round it. prologue 0: a [M, K] as it is; 1: RMSNorm(a) with norm_w [K]
// and eps; 2: SwiGLU of a [M, 2K] = [gate | up]. W4A16, or with a_g (a float32
// scalar) W4A4: the prologue's output quantized with decode scale a_g, as
// jaxfp4_gemm_w4a4_quantize_a quantizes a. Without a prologue, W4A16 runs the
// ordinary kernels (any M and weights), W4A4 the in-kernel quantization's
// (packed, M <= 8); with one, the fused kernel (packed, M <= 8). Where rows are
// staged, M rows of qa_row_bytes(K) must fit kQaMaxBytes
// (jaxfp4/primitives/fused_gemm.py checks the same before choosing this target).
// epilogue 1 (kEpilogueSwiGluInterleaved, packed weights, bf16, no residual):
// out [M, N/2] = silu(gate) * up of the rounded product (gate and up rows
// interleaved by 8), in the packed kernel's store.
// Unused operands (norm_w without prologue 1, a_g for W4A16, residual when
// none) are empty.
ffi::Error GemmFusedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer norm_w, ffi::AnyBuffer a_g,
                         ffi::AnyBuffer b_data, ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g, ffi::AnyBuffer residual,
                         ffi::Result<ffi::AnyBuffer> out, int32_t prologue, float eps, int32_t epilogue,
                         int32_t b_sf_layout, int32_t b_packing) {
  Launch L;
  int64_t M = 0, N = 0, K = 0;
  if (auto e = prepare_fused(a, given(norm_w), given(a_g), b_data, b_scales, b_g, given(residual), *out, prologue,
                             eps, epilogue, b_sf_layout, b_packing, &L, &M, &N, &K);
      e.failure())
    return e;
  return finish(L, M, N, K, stream);
}

// W4A4 from float activations as one call of two kernels: a [M, K] quantized
// with a_g and written as the values the codes stand for (jaxfp4_quantize_decoded
// into `decoded`, with g_ab = a_g * b_g), then the W4A16 kernel on them with
// g_ab as the weights' scale (and the residual in its store): the bits of
// jaxfp4_quantize then jaxfp4_gemm_w4a4 (gemm.py's decoded route). The GEMM is
// a programmatic dependent whose producer copies its weights (operands of the
// call; the quantize kernel writes only `decoded` and `g_ab`) before
// griddepcontrol.wait, so the quantize launch (~2.5 us) hides under the GEMM's
// ring fill; the quantize launch itself is ordinary, so nothing before the call
// can still be writing the weights. decoded and g_ab are results, scratch to
// the caller (the FFI scratch allocator is unsafe under command buffers).
ffi::Error GemmW4A4DecodedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer a_g, ffi::AnyBuffer b_data,
                               ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g, ffi::AnyBuffer residual,
                               ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> decoded,
                               ffi::Result<ffi::AnyBuffer> g_ab, int32_t b_sf_layout, int32_t b_packing) {
  const Dims ad = a.dimensions(), dd = decoded->dimensions();
  if (ad.size() != 2 || dd.size() != 2 || ad[0] != dd[0] || ad[1] != dd[1])
    return bad("w4a4_decoded: a and decoded must be [M, K], got " + dims_str(ad) + " and " + dims_str(dd));
  if (a_g.dimensions().size() != 0 || b_g.dimensions().size() != 0)
    return bad("w4a4_decoded: a_g and b_g must be F32 scalars");
  if (b_packing != 1) return bad("w4a4_decoded needs sm90-packed weights (b_packing 1)");
  // The GEMM's checks (on the buffers it will read) before the quantize launch:
  // a rejected call launches nothing.
  Launch L;
  int64_t M = 0, N = 0, K = 0;
  if (auto e = prepare_fused(*decoded, nullptr, nullptr, b_data, b_scales, *g_ab, given(residual), *out,
                             kPrologueNone, 0.0f, kEpilogueNone, b_sf_layout, b_packing, &L, &M, &N, &K);
      e.failure())
    return e;
  if (auto e = run_quantize_decoded(stream, a, a_g, b_g, *decoded, *g_ab, /*programmatic=*/false); e.failure())
    return e;
  L.p.weights_ready = 1;
  return finish(L, M, N, K, stream);
}

// A bad() error with `where` ("chain link 2: ") put before its rule.
ffi::Error in_context(const std::string& where, const ffi::Error& e) {
  const std::string what = e.message(), prefix = bad("").message();
  return bad(where + (what.rfind(prefix, 0) == 0 ? what.substr(prefix.size()) : what));
}

// A chain of fused GEMMs (jaxfp4.matmul_chain) as one call: link i is
// jaxfp4_gemm_fused on a_i, with a_0 the call's first operand and a_i (i > 0)
// link i-1's result, and residual_i an operand, nothing, or an earlier link's
// result (res_from[i] = j >= 0). Operands: a_0, then per link norm_w, a_g,
// b_data, b_scales, b_g, residual (empty where unused, and where res_from names
// a result), and for a rotary link (epilogue 2, jaxfp4.RotaryKVCache) cos, sin,
// slot, k_cache, v_cache; results: each link's out, then each rotary link's
// k_cache and v_cache (aliased to its operands: written in place). Every link is validated before any
// launches; each is bit for bit its own jaxfp4_gemm_fused call.
// Why one call: XLA records each custom call as a graph node of its own, and
// only launches made inside one call keep their programmatic dependent launch
// (benchmarks/kernel/NOTES.md, session 12). A later link's weights are this
// call's operands, which no kernel of the call writes, so its producer copies
// them before griddepcontrol.wait (weights_ready): its ring fills while the
// link before it finishes, hiding its start-up (session 14).
ffi::Error GemmChainImpl(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                         ffi::Span<const int32_t> prologue, ffi::Span<const float> eps,
                         ffi::Span<const int32_t> epilogue, ffi::Span<const int32_t> b_sf_layout, ffi::Span<const int32_t> b_packing,
                         ffi::Span<const int32_t> res_from, ffi::Span<const int32_t> rotary_heads) {
  constexpr size_t kPerLink = 6, kRotary = 5, kMaxLinks = 8;
  const size_t n = epilogue.size();
  if (n == 0 || n > kMaxLinks) return bad("a chain has 1 to " + std::to_string(kMaxLinks) + " links");
  if (prologue.size() != n || eps.size() != n || b_sf_layout.size() != n || b_packing.size() != n ||
      res_from.size() != n || rotary_heads.size() != n)
    return bad("a chain's attributes need one entry per link");
  size_t n_rotary = 0;
  for (size_t i = 0; i < n; ++i) n_rotary += epilogue[i] == kEpilogueRotaryKV ? 1 : 0;
  if (args.size() != 1 + kPerLink * n + kRotary * n_rotary || rets.size() != n + 2 * n_rotary)
    return bad("a chain of n links with r rotary ones takes 1 + 6 n + 5 r operands and n + 2 r results");
  // The call's buffers, in order: operands (a_0, then 6 per link, 5 more per
  // rotary link) and results (each link's out, then 2 caches per rotary link).
  std::vector<ffi::AnyBuffer> in, outs;
  for (size_t j = 0; j < args.size(); ++j) {
    auto v = args.get<ffi::AnyBuffer>(j);
    if (!v.has_value()) return bad("chain operand " + std::to_string(j) + " is not a buffer");
    in.push_back(*v);
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (!r.has_value()) return bad("chain result " + std::to_string(i) + " is not a buffer");
    outs.push_back(**r);
  }
  Launch L[kMaxLinks];
  int64_t M[kMaxLinks], N[kMaxLinks], K[kMaxLinks];
  size_t next_op = 1, next_cache = n;
  for (size_t i = 0; i < n; ++i) {
    const std::string link = "chain link " + std::to_string(i) + ": ";
    const ffi::AnyBuffer* ops = &in[next_op];  // norm_w, a_g, b_data, b_scales, b_g, residual[, rotary's 5]
    next_op += kPerLink;
    RotaryBuffers rot{};
    const bool rotary = epilogue[i] == kEpilogueRotaryKV;
    if (rotary) {  // cos, sin, slot, k_cache, v_cache; results k_cache, v_cache
      rot = {&ops[6], &ops[7], &ops[8], &ops[9], &ops[10], &outs[next_cache], &outs[next_cache + 1], rotary_heads[i]};
      next_op += kRotary;
      next_cache += 2;
    } else if (rotary_heads[i] != 0) {
      return bad(link + "rotary_heads is set on a link without the rotary epilogue");
    }
    const ffi::AnyBuffer* residual = given(ops[5]);
    if (res_from[i] >= 0) {
      if (static_cast<size_t>(res_from[i]) >= i) return bad(link + "res_from must name an earlier link");
      if (residual != nullptr) return bad(link + "a residual operand and res_from both given");
      residual = &outs[res_from[i]];
    }
    const ffi::AnyBuffer& a = i == 0 ? in[0] : outs[i - 1];
    if (auto e = prepare_fused(a, given(ops[0]), given(ops[1]), ops[2], ops[3], ops[4], residual, outs[i],
                               prologue[i], eps[i], epilogue[i], b_sf_layout[i], b_packing[i], &L[i], &M[i], &N[i],
                               &K[i], rotary ? &rot : nullptr);
        e.failure())
      return in_context(link, e);
    L[i].p.weights_ready = i > 0 ? 1 : 0;
    L[i].programmatic = i > 0;
  }
  for (size_t i = 0; i < n; ++i)
    if (auto e = finish(L[i], M[i], N[i], K[i], stream); e.failure()) return e;
  return ffi::Error::Success();
}

}  // namespace sm90_gemm
}  // namespace jaxfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4GemmFusedCuda, jaxfp4::sm90_gemm::GemmFusedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // a [M, K] or [M, 2K] BF16
                                  .Arg<ffi::AnyBuffer>()  // norm_w [K] BF16, or empty
                                  .Arg<ffi::AnyBuffer>()  // a_g F32 [] (W4A4), or empty
                                  .Arg<ffi::AnyBuffer>()  // b_data U8
                                  .Arg<ffi::AnyBuffer>()  // b_scales F8E4M3FN
                                  .Arg<ffi::AnyBuffer>()  // b_g F32 []
                                  .Arg<ffi::AnyBuffer>()  // residual [M, N] BF16, or empty
                                  .Ret<ffi::AnyBuffer>()  // out [M, N]
                                  .Attr<int32_t>("prologue")
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("epilogue")
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4GemmW4A4DecodedCuda, jaxfp4::sm90_gemm::GemmW4A4DecodedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // a [M, K] F32/BF16/F16
                                  .Arg<ffi::AnyBuffer>()  // a_g [] F32
                                  .Arg<ffi::AnyBuffer>()  // b_data U8 (sm90-packed)
                                  .Arg<ffi::AnyBuffer>()  // b_scales F8E4M3FN
                                  .Arg<ffi::AnyBuffer>()  // b_g [] F32
                                  .Arg<ffi::AnyBuffer>()  // residual [M, N] BF16, or empty
                                  .Ret<ffi::AnyBuffer>()  // out [M, N]
                                  .Ret<ffi::AnyBuffer>()  // decoded [M, K] BF16 (scratch)
                                  .Ret<ffi::AnyBuffer>()  // g_ab [] F32 (scratch)
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4GemmChainCuda, jaxfp4::sm90_gemm::GemmChainImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .RemainingArgs()  // a_0, then per link norm_w, a_g, b_data, b_scales, b_g,
                                                    // residual (rotary links: + cos, sin, slot, k_cache, v_cache)
                                  .RemainingRets()  // per link out [M, N_i]; per rotary link k_cache, v_cache
                                  .Attr<ffi::Span<const int32_t>>("prologue")
                                  .Attr<ffi::Span<const float>>("eps")
                                  .Attr<ffi::Span<const int32_t>>("epilogue")
                                  .Attr<ffi::Span<const int32_t>>("b_sf_layout")
                                  .Attr<ffi::Span<const int32_t>>("b_packing")
                                  .Attr<ffi::Span<const int32_t>>("res_from")
                                  .Attr<ffi::Span<const int32_t>>("rotary_heads"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4GemmW4A4QuantizeACuda, jaxfp4::sm90_gemm::GemmW4A4QuantizeAImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // a [*La, M, K] BF16
                                  .Arg<ffi::AnyBuffer>()  // a_g F32 [*La]
                                  .Arg<ffi::AnyBuffer>()  // b_data U8 (sm90-packed)
                                  .Arg<ffi::AnyBuffer>()  // b_scales F8E4M3FN
                                  .Arg<ffi::AnyBuffer>()  // b_g F32 [*Lb]
                                  .Ret<ffi::AnyBuffer>()  // out [*L, M, N]
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4GemmW4A16Cuda, jaxfp4::sm90_gemm::GemmW4A16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // a [*La, M, K] BF16/F16
                                  .Arg<ffi::AnyBuffer>()  // b_data U8
                                  .Arg<ffi::AnyBuffer>()  // b_scales F8E4M3FN
                                  .Arg<ffi::AnyBuffer>()  // b_g F32 [*Lb]
                                  .Ret<ffi::AnyBuffer>()  // out [*L, M, N]
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4GemmW4A4Cuda, jaxfp4::sm90_gemm::GemmW4A4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // a_data U8 [*La, M, K/2]
                                  .Arg<ffi::AnyBuffer>()  // a_scales F8E4M3FN
                                  .Arg<ffi::AnyBuffer>()  // a_g F32 [*La]
                                  .Arg<ffi::AnyBuffer>()  // b_data U8
                                  .Arg<ffi::AnyBuffer>()  // b_scales F8E4M3FN
                                  .Arg<ffi::AnyBuffer>()  // b_g F32 [*Lb]
                                  .Ret<ffi::AnyBuffer>()  // out [*L, M, N]
                                  .Attr<int32_t>("a_sf_layout")
                                  .Attr<int32_t>("b_sf_layout")
                                  .Attr<int32_t>("b_packing"),
                              {ffi::Traits::kCmdBufferCompatible});
