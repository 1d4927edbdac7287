// Standalone driver for csrc/cuda/sm90/quantize.cu: calls the FFI handlers
// QuantizeImpl / QuantizeDynamicImpl exactly as XLA does (XLA_FFI_Buffer ->
// ffi::AnyBuffer) and compares every output byte (codes, the WHOLE padded
// scale array, dynamic g) bit for bit with the CPU handlers' (csrc/cpu/
// quantize.cc: the host reference the test suite checks against the pure-JAX
// one) on the same inputs. `check` also compares the kernel's fast arithmetic
// with format.h's over ALL its inputs (every float32 bit pattern). `bench`
// times the handlers against a device-to-device copy of the same bytes.
// Small enough for compute-sanitizer. Build and run from the repository root (on a Hopper GPU):
//   FFI="$(python3 -c 'import jax.ffi as f; print(f.include_dir())')"
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc/include -I "$FFI" benchmarks/kernel/quantize_driver.cu -o /tmp/qdrv
//   /tmp/qdrv check                                          (every case)
//   /tmp/qdrv bench                                          (timings, a table at the end;
//                                                             QDRV_CASES=1,2 runs cases 1 and 2 only)
//   compute-sanitizer --tool memcheck /tmp/qdrv check
//   compute-sanitizer --tool racecheck /tmp/qdrv check quick (a subset)
#include "../../csrc/cuda/sm90/quantize.cu"
#include "../../csrc/cpu/quantize.cc"  // the reference
#include "driver_common.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

using namespace jaxfp4;

// Input dtypes use quantize.cu's InputType numbering: kF32 = 0, kBF16 = 1, kF16 = 2.
static const char* kTypeName[3] = {"f32", "bf16", "f16"};
static const XLA_FFI_DataType kTypeFfi[3] = {XLA_FFI_DataType_F32, XLA_FFI_DataType_BF16, XLA_FFI_DataType_F16};
static const int kTypeBytes[3] = {4, 2, 2};

// One XLA_FFI_Buffer as XLA hands it to a handler. Not copyable: buf.dims
// points into this object.
struct Buf {
  XLA_FFI_Buffer buf;
  int64_t dims[kMaxBatchRank + 2];
  Buf(XLA_FFI_DataType t, void* data, const std::vector<int64_t>& d) {
    buf.struct_size = XLA_FFI_Buffer_STRUCT_SIZE;
    buf.extension_start = nullptr;
    buf.dtype = t;
    buf.data = data;
    buf.rank = static_cast<int64_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) dims[i] = d[i];
    buf.dims = dims;
  }
  Buf(const Buf&) = delete;
  ffi::AnyBuffer any() const { return ffi::AnyBuffer(&buf); }
};

struct Case {
  int M, K, layout, type;
  bool dyn;
  std::vector<int64_t> xb;  // x's batch axes (x is [*xb, M, K])
  std::vector<int64_t> gb;  // static g's axes (each equal to xb's or 1); unused when dyn
  bool special;             // entry 0: NaN/Inf/huge/tiny/zero blocks; entry 1 all zero; entry 2 non-finite
  std::vector<float> gvals; // static g values, cycled over g's entries, instead of random ones;
                            // with `special`, every entry gets entry 0's specials
};

static std::mt19937 rng(20240611);

static int64_t prod(const std::vector<int64_t>& v) { return cpu::prod(v.data(), static_cast<int>(v.size())); }

static std::string desc(const Case& c) {
  std::string s = "M=" + std::to_string(c.M) + " K=" + std::to_string(c.K) + " layout=" + std::to_string(c.layout) +
                  " " + kTypeName[c.type] + (c.dyn ? " dynamic" : " static");
  if (!c.xb.empty()) s += " x" + dims_str(c.xb) + (c.dyn ? "" : " g" + dims_str(c.gb));
  return s + (c.special ? " specials" : "") + (c.gvals.empty() ? "" : " odd g");
}

static bool run_case(const Case& cs, cudaStream_t stream) {
  const int M = cs.M, K = cs.K, C = K / 16, t = cs.type;
  const SfLayout lay = static_cast<SfLayout>(cs.layout);
  const int64_t L = prod(cs.xb), n = L * M * K, Rp = sf_rows(lay, M), Cp = sf_cols(lay, C);
  const int64_t per_entry = static_cast<int64_t>(M) * K;
  // Inputs: normal values, one power-of-two magnitude per 16-block in [2^-14, 2^5]
  // so that block scales span underflow (SF 0), E4M3 subnormals, normals and
  // saturation at 448; raw holds the input bytes, x their values (to redraw
  // zeros: no value is 0 outside the deliberate zero blocks).
  std::vector<float> x(n);
  std::vector<uint8_t> raw(n * kTypeBytes[t]);
  auto store = [&](int64_t i, float v) {
    if (t == kF32) {
      x[i] = v;
      memcpy(&raw[i * 4], &v, 4);
    } else {
      const uint16_t h = t == kBF16 ? float_to_bf16(v) : float_to_f16(v);
      x[i] = t == kBF16 ? bf16_to_float(h) : f16_to_float(h);
      memcpy(&raw[i * 2], &h, 2);
    }
  };
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t b = 0; b < n / 16; ++b) {
    const float mag = std::ldexp(1.0f, static_cast<int>(rng() % 20) - 14);
    for (int64_t i = b * 16; i < b * 16 + 16; ++i) {
      do store(i, nd(rng) * mag);
      while (x[i] == 0.0f);  // redraw what the dtype rounds to 0 (f16 underflow)
    }
  }
  if (cs.special) {  // spec section 2's consequences; row r, block c, element i of entry e
    const float inf = INFINITY, nan = NAN, huge = t == kF16 ? 65504.0f : 3.0e38f,
                tiny = t == kF16 ? 6.0e-8f : 1.0e-40f;  // a subnormal of each dtype
    for (int64_t e = 0; e < (cs.gvals.empty() ? 1 : L); ++e) {
      auto at = [&](int r, int c, int i) -> int64_t { return e * per_entry + static_cast<int64_t>(r) * K + c * 16 + i; };
      store(at(0, 0, 3), nan);  // NaN block: SF 0x7F
      store(at(0, 1, 0), inf);  // Inf: SF 448, code 6
      store(at(0, 2, 15), -inf);  // -Inf: code 0xF
      store(at(1, 0, 7), huge);  // huge: gs*vmax may overflow
      for (int i = 0; i < 16; ++i) store(at(1, 1, i), i & 1 ? -tiny : tiny);  // underflow: SF 0, codes 0/8
      for (int i = 0; i < 16; ++i) store(at(2, 0, i), i & 1 ? -0.0f : 0.0f);  // zero block, -0 keeps its sign
      store(at(2, 1, 2), nan);
      store(at(2, 1, 9), -inf);  // NaN wins over Inf
      for (int i = 0; i < 16; ++i) store(at(3, 3, i), i == 5 ? inf : tiny);
    }
    if (cs.gvals.empty()) {
      for (int64_t i = per_entry; i < 2 * per_entry && L > 1; ++i) store(i, 0.0f);  // amax 0: dynamic g = 1
      for (int64_t i = 2 * per_entry; i < 3 * per_entry && L > 2; ++i)  // no finite value: g = 1 as well
        store(i, (i - 2 * per_entry) < K && i % 16 == 4 ? nan : (i & 1 ? inf : -inf));
    }
  }
  // g: static, one value in [2^-6, 2^-5) per g entry, or the case's own values
  // (dynamic: the handlers compute it).
  const std::vector<int64_t> gdims = cs.dyn ? cs.xb : cs.gb;
  std::vector<float> g(prod(gdims));
  for (size_t i = 0; i < g.size(); ++i)
    g[i] = cs.gvals.empty() ? std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, -6)
                            : cs.gvals[i % cs.gvals.size()];
  std::vector<int64_t> xd = cs.xb, dd_dims = cs.xb, sd = cs.xb;
  xd.insert(xd.end(), {M, K});
  dd_dims.insert(dd_dims.end(), {M, K / 2});
  sd.insert(sd.end(), {Rp, Cp});
  // The reference: the CPU handler on the same bytes (it zeroes every padded scale).
  std::vector<uint8_t> rdata(n / 2), rsc(L * Rp * Cp);
  std::vector<float> gref(cs.dyn ? L : 0);
  {
    const Buf hx(kTypeFfi[t], raw.data(), xd), hd(XLA_FFI_DataType_U8, rdata.data(), dd_dims),
        hs(XLA_FFI_DataType_F8E4M3FN, rsc.data(), sd), hg(XLA_FFI_DataType_F32, cs.dyn ? gref.data() : g.data(), gdims);
    const ffi::Error e = cs.dyn ? cpu::quantize_dynamic_impl(hx.any(), hd.any(), hs.any(), hg.any(), cs.layout)
                                : cpu::quantize_impl(hx.any(), hg.any(), hd.any(), hs.any(), cs.layout);
    if (e.failure()) {
      printf("FAIL %s: the CPU reference refused it: %s\n", desc(cs).c_str(), e.message().c_str());
      return false;
    }
  }
  // Device buffers of exactly the handler's sizes (memcheck sees any overrun);
  // outputs poisoned so that an element the kernels never write fails.
  void *dx, *dd, *ds, *dg;
  CK(cudaMalloc(&dx, raw.size()));
  CK(cudaMalloc(&dd, rdata.size()));
  CK(cudaMalloc(&ds, rsc.size()));
  CK(cudaMalloc(&dg, g.size() * 4));
  CK(cudaMemcpy(dx, raw.data(), raw.size(), cudaMemcpyHostToDevice));
  CK(cudaMemset(dd, 0xAB, rdata.size()));
  CK(cudaMemset(ds, 0xAB, rsc.size()));
  if (cs.dyn) {
    CK(cudaMemset(dg, 0xFF, g.size() * 4));  // NaN
  } else {
    CK(cudaMemcpy(dg, g.data(), g.size() * 4, cudaMemcpyHostToDevice));
  }
  CK(cudaDeviceSynchronize());
  const Buf bx(kTypeFfi[t], dx, xd), bd(XLA_FFI_DataType_U8, dd, dd_dims), bs(XLA_FFI_DataType_F8E4M3FN, ds, sd),
      bg(XLA_FFI_DataType_F32, dg, gdims);
  const ffi::Error err = cs.dyn ? QuantizeDynamicImpl(stream, bx.any(), bd.any(), bs.any(), bg.any(), cs.layout)
                                : QuantizeImpl(stream, bx.any(), bg.any(), bd.any(), bs.any(), cs.layout);
  CK(cudaStreamSynchronize(stream));
  CK(cudaGetLastError());
  std::string why;
  if (err.failure()) {
    why = "handler error: " + err.message();
  } else {
    std::vector<uint8_t> od(rdata.size()), os(rsc.size());
    std::vector<float> og(L);
    CK(cudaMemcpy(od.data(), dd, od.size(), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(os.data(), ds, os.size(), cudaMemcpyDeviceToHost));
    if (cs.dyn) CK(cudaMemcpy(og.data(), dg, L * 4, cudaMemcpyDeviceToHost));
    auto diff = [&](const char* what, const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
      int64_t bad = 0, first = -1;
      for (size_t i = 0; i < got.size(); ++i)
        if (got[i] != want[i] && bad++ == 0) first = static_cast<int64_t>(i);
      if (bad == 0) return;
      char s[160];
      snprintf(s, sizeof s, " %s: %lld bad (first at %lld: got 0x%02x want 0x%02x)", what,
               static_cast<long long>(bad), static_cast<long long>(first), got[first], want[first]);
      why += s;
    };
    diff("codes", od, rdata);
    diff("scales", os, rsc);
    for (int64_t z = 0; cs.dyn && z < L; ++z)
      if (float_to_bits(og[z]) != float_to_bits(gref[z])) {
        char s[120];
        snprintf(s, sizeof s, " g[%lld]: got %a want %a", static_cast<long long>(z), og[z], gref[z]);
        why += s;
        break;
      }
  }
  cudaFree(dx);
  cudaFree(dd);
  cudaFree(ds);
  cudaFree(dg);
  if (!why.empty()) printf("FAIL %s:%s\n", desc(cs).c_str(), why.c_str());
  return why.empty();
}

// A call with inconsistent shapes must return an error and launch nothing
// (the poisoned outputs stay poisoned). Buffers have the sizes the shapes name.
static bool run_bad(const char* what, bool dyn, int type, std::vector<int64_t> xd, std::vector<int64_t> gd,
                    std::vector<int64_t> dd, std::vector<int64_t> sd, int layout, cudaStream_t stream) {
  auto bytes = [](const std::vector<int64_t>& d, int64_t w) { return static_cast<size_t>(prod(d) * w); };
  void *px, *pd, *ps, *pg;
  CK(cudaMalloc(&px, bytes(xd, kTypeBytes[type])));
  CK(cudaMalloc(&pd, bytes(dd, 1)));
  CK(cudaMalloc(&ps, bytes(sd, 1)));
  CK(cudaMalloc(&pg, bytes(gd, 4)));
  CK(cudaMemset(px, 0, bytes(xd, kTypeBytes[type])));
  CK(cudaMemset(pd, 0xAB, bytes(dd, 1)));
  CK(cudaMemset(ps, 0xAB, bytes(sd, 1)));
  CK(cudaMemset(pg, 0, bytes(gd, 4)));
  CK(cudaDeviceSynchronize());
  const Buf bx(kTypeFfi[type], px, xd), bd(XLA_FFI_DataType_U8, pd, dd), bs(XLA_FFI_DataType_F8E4M3FN, ps, sd),
      bg(XLA_FFI_DataType_F32, pg, gd);
  const ffi::Error err = dyn ? QuantizeDynamicImpl(stream, bx.any(), bd.any(), bs.any(), bg.any(), layout)
                             : QuantizeImpl(stream, bx.any(), bg.any(), bd.any(), bs.any(), layout);
  CK(cudaStreamSynchronize(stream));
  CK(cudaGetLastError());
  std::vector<uint8_t> hd(bytes(dd, 1)), hs(bytes(sd, 1));
  CK(cudaMemcpy(hd.data(), pd, hd.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hs.data(), ps, hs.size(), cudaMemcpyDeviceToHost));
  bool untouched = true;
  for (uint8_t b : hd) untouched = untouched && b == 0xAB;
  for (uint8_t b : hs) untouched = untouched && b == 0xAB;
  cudaFree(px);
  cudaFree(pd);
  cudaFree(ps);
  cudaFree(pg);
  if (err.success() || !untouched) {
    printf("FAIL bad shape (%s): %s\n", what, err.success() ? "accepted" : "error returned but outputs written");
    return false;
  }
  return true;
}

// ---- the kernel's arithmetic against format.h, over every input ------------

constexpr int kExhaustive = 7;

// Mismatch counts of the comparisons below, and the first input of each that
// failed (UINT32_MAX: none).
struct Exhaustive {
  unsigned long long bad[kExhaustive];
  uint32_t first[kExhaustive];
};

__device__ void note_mismatch(Exhaustive* out, int which, uint32_t input) {
  atomicAdd(&out->bad[which], 1ull);
  atomicMin(&out->first[which], input);
}

// The 16 codes of a block by format.h's e2m1_encode, packed.
template <typename B>
__device__ uint2 codes_exact(const B& blk) {
  uint32_t word[2] = {0u, 0u};
  for (int i = 0; i < 16; ++i) word[i / 8] |= e2m1_encode(blk.value(i)) << (4 * (i % 8));
  return make_uint2(word[0], word[1]);
}

// 16-bit blocks made of every 16-bit pattern: abs_max against nan_max_abs,
// and the fast packing (os = 1, NaN replaced by 0) against e2m1_encode.
template <typename T>
__device__ void check_block16(Exhaustive* out, uint32_t group, int which) {
  Block16<T> raw, clean;
  float want_max = 0.0f;
  for (int k = 0; k < 8; ++k) {
    raw.w[k] = (group * 16 + 2 * k) | (group * 16 + 2 * k + 1) << 16;
    clean.w[k] = raw.w[k];
  }
  for (int i = 0; i < 16; ++i) {
    want_max = nan_max_abs(want_max, raw.value(i));
    if (raw.value(i) != raw.value(i)) clean.w[i / 2] &= i & 1 ? 0x0000FFFFu : 0xFFFF0000u;
  }
  const float got_max = raw.abs_max();
  const uint2 want = codes_exact(clean);
  if (!(got_max != got_max && want_max != want_max) && __float_as_uint(got_max) != __float_as_uint(want_max))
    note_mismatch(out, which, group * 16);
  if (pack8_fast(clean, 0, 1.0f) != want.x || pack8_fast(clean, 8, 1.0f) != want.y) note_mismatch(out, which, group * 16);
}

// Thread group gi covers the float32 bit patterns 16 gi .. 16 gi + 15:
// 0: e2m1_encode_fast == e2m1_encode (device build; the host build is
//    tests/test_format_encode.py's),
// 1: e4m3_encode_hw == e4m3_encode_satfinite,
// 2: pack8_fast of a float32 block of the 16 patterns (NaN replaced by 0: the
//    fast path never sees a NaN product) with os = 1 == e2m1_encode's codes,
// 3: e4m3_decode_hw == e4m3_decode for the 256 bytes (NaN: both NaN),
// 4, 5: the same as 2 and abs_max for bf16 and f16 blocks of all 2^16 patterns,
// 6: __frcp_rn (the kernel's output scale) == IEEE 1.0f / x (format.h's).
__global__ void exhaustive_kernel(Exhaustive* out) {
  const uint64_t groups = uint64_t{1} << 28;
  for (uint64_t gi = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; gi < groups;
       gi += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    BlockF32 blk;
    for (int i = 0; i < 16; ++i) {
      const uint32_t u = static_cast<uint32_t>(gi * 16 + i);
      const float v = __uint_as_float(u);
      if (e2m1_encode_fast(v) != e2m1_encode(v)) note_mismatch(out, 0, u);
      if (e4m3_encode_hw(v) != e4m3_encode_satfinite(v)) note_mismatch(out, 1, u);
      const float r = __frcp_rn(v), q = 1.0f / v;
      if (!(r != r && q != q) && __float_as_uint(r) != __float_as_uint(q)) note_mismatch(out, 6, u);
      blk.w[i] = v != v ? 0u : u;
    }
    const uint2 want = codes_exact(blk);
    if (pack8_fast(blk, 0, 1.0f) != want.x || pack8_fast(blk, 8, 1.0f) != want.y)
      note_mismatch(out, 2, static_cast<uint32_t>(gi * 16));
    if (gi < 256) {
      const float a = e4m3_decode_hw(static_cast<uint32_t>(gi)), b = e4m3_decode(static_cast<uint8_t>(gi));
      if (!(a != a && b != b) && __float_as_uint(a) != __float_as_uint(b)) note_mismatch(out, 3, static_cast<uint32_t>(gi));
    }
    if (gi < 4096) {
      check_block16<__nv_bfloat16_raw>(out, static_cast<uint32_t>(gi), 4);
      check_block16<__half>(out, static_cast<uint32_t>(gi), 5);
    }
  }
}

// Returns the number of comparisons that failed.
static int check_exhaustive() {
  Exhaustive h;
  for (int i = 0; i < kExhaustive; ++i) {
    h.bad[i] = 0;
    h.first[i] = UINT32_MAX;
  }
  Exhaustive* d;
  CK(cudaMalloc(&d, sizeof h));
  CK(cudaMemcpy(d, &h, sizeof h, cudaMemcpyHostToDevice));
  exhaustive_kernel<<<jaxfp4::sm_count() * 8, 256>>>(d);
  CK(cudaGetLastError());
  CK(cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost));
  CK(cudaFree(d));
  const char* what[kExhaustive] = {"e2m1_encode_fast vs e2m1_encode, all 2^32 floats",
                                   "hardware e4m3 encode vs e4m3_encode_satfinite, all 2^32 floats",
                                   "pack8_fast (f32 blocks) vs e2m1_encode, all 2^32 floats but NaN",
                                   "hardware e4m3 decode vs e4m3_decode, all 256 bytes",
                                   "bf16 blocks: abs_max vs nan_max_abs, pack8_fast vs e2m1_encode, all 2^16",
                                   "f16 blocks: abs_max vs nan_max_abs, pack8_fast vs e2m1_encode, all 2^16",
                                   "__frcp_rn vs IEEE 1.0f / x, all 2^32 floats"};
  int fails = 0;
  for (int i = 0; i < kExhaustive; ++i) {
    printf("%s %s: %llu mismatches", h.bad[i] ? "FAIL" : "ok", what[i], h.bad[i]);
    if (h.bad[i]) printf(" (first at 0x%08x)", h.first[i]);
    printf("\n");
    fails += h.bad[i] != 0;
  }
  return fails;
}

static int check_all(bool quick) {
  std::vector<Case> cases;
  const int Ms[] = {1, 7, 8, 9, 31, 33, 127, 129}, Ks[] = {16, 48, 272, 4096};
  if (quick) {
    // Each (layout, dtype, static/dynamic) once, M rotating over 1, 9, 33.
    const int qm[] = {1, 9, 33};
    for (int i = 0; i < 18; ++i) cases.push_back({qm[(i + i / 3) % 3], 272, i % 3, (i / 3) % 3, i >= 9, {}, {}, false});
  } else {
    // Full (layout x dtype x static/dynamic) grid for K = 272 and for M = 33;
    // the other (M, K) pairs get a static and a dynamic case, layout and dtype rotating.
    int r = 0;
    for (int M : Ms)
      for (int K : Ks) {
        if (K == 272 || M == 33) {
          for (int l = 0; l < 3; ++l)
            for (int t = 0; t < 3; ++t)
              for (int dyn = 0; dyn < 2; ++dyn) cases.push_back({M, K, l, t, dyn == 1, {}, {}, false});
        } else {
          for (int dyn = 0; dyn < 2; ++dyn, ++r) cases.push_back({M, K, r % 3, (r / 3) % 3, dyn == 1, {}, {}, false});
        }
      }
  }
  // Batched x [2, 3, M, K]: static g per entry (g_mode 0), one g (g_mode 1), g
  // broadcast along axis 0 (g_mode 2, through the batch map); dynamic per entry.
  const std::vector<std::vector<int64_t>> gshapes = {{2, 3}, {1, 1}, {1, 3}};
  for (int l = 0; l < 3; ++l) {
    for (const auto& gs : gshapes) cases.push_back({9, 272, l, (l + 1) % 3, false, {2, 3}, gs, false});
    cases.push_back({l == 0 ? 1 : 33, 48, l, l, true, {2, 3}, {}, false});
  }
  // Batch entries whose scale rows need no padding (M a multiple of the row
  // tile), which the kernel addresses as one flattened batch: g per entry, one
  // g, g through the batch map, dynamic.
  cases.push_back({128, 80, 1, kBF16, false, {2}, {2}, false});
  cases.push_back({8, 48, 2, kF16, false, {3}, {1}, false});
  cases.push_back({16, 272, 0, kF32, false, {2, 3}, {2, 1}, false});
  cases.push_back({256, 64, 1, kF32, true, {2}, {}, false});
  // Specials, x [3, 9, 64]: every dtype, static and dynamic, every layout.
  for (int t = 0; t < 3; ++t)
    for (int dyn = 0; dyn < 2; ++dyn) cases.push_back({9, 64, (t + dyn) % 3, t, dyn == 1, {3}, {3}, true});
  // Specials under odd static g, one g per entry: 0 (gs = Inf), Inf, NaN,
  // negative, -0, a denormal, tiny and huge (scales that saturate or underflow,
  // output scales that overflow or vanish), and a normal one.
  const std::vector<float> odd_g = {0.0f, INFINITY, NAN, -0.02f, -0.0f, -INFINITY, 1e-45f, 1e-38f, 3e38f, 1e30f,
                                    0.015625f};
  const int64_t n_odd = static_cast<int64_t>(odd_g.size());
  for (int t = 0; t < 3; ++t) cases.push_back({9, 64, t, t, false, {n_odd}, {n_odd}, true, odd_g});

  cudaStream_t stream;  // XLA's stream is never the legacy default stream
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int fails = 0, total = 0;
  for (const Case& c : cases) {
    fails += !run_case(c, stream);
    ++total;
  }
  // Bad shapes, one set per handler: K % 16 != 0, g not broadcastable, wrong scale padding, wrong g result.
  fails += !run_bad("static K=24", false, kF32, {4, 24}, {}, {4, 12}, {4, 1}, 0, stream);
  fails += !run_bad("static g [3] for x [2,..]", false, kBF16, {2, 8, 32}, {3}, {2, 8, 16}, {2, 8, 2}, 0, stream);
  fails += !run_bad("dynamic 128x4 scales [9,4]", true, kBF16, {9, 64}, {}, {9, 32}, {9, 4}, 1, stream);
  fails += !run_bad("dynamic g [3] for x [2,..]", true, kF16, {2, 8, 32}, {3}, {2, 8, 16}, {2, 8, 4}, 2, stream);
  total += 4;
  CK(cudaStreamDestroy(stream));
  fails += check_exhaustive();
  total += kExhaustive;
  printf("check: %d failures of %d\n", fails, total);
  return fails;
}

// ---- bench ------------------------------------------------------------------

// Non-zero random inputs: +-(1 + u) * 2^e, u uniform in [0, 1), e in [-8, 2].
template <typename T>
__global__ void fill_random(T* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix_hash(i, seed);
    const float v = ldexpf(1.0f + static_cast<float>(h & 0xFFFF) / 65536.0f, static_cast<int>((h >> 16) % 11) - 8);
    p[i] = static_cast<T>((h >> 40) & 1 ? -v : v);
  }
}

struct BenchCase {
  const char* name;
  int M, K, type, layout;
  bool dyn;
};

// Device time per call of `call(copy)` for copy = 0, 1, ... (rotating over
// `copies`), calls captured into one CUDA graph (as XLA's command buffers run
// them: no launch gaps) and the graph replayed; the median of the replays.
template <typename F>
static double time_per_call_us(cudaStream_t stream, int copies, F call) {
  const int calls = std::max(copies, 40);
  call(0);  // warm-up outside the capture: occupancy queries, module load
  CK(cudaStreamSynchronize(stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) call(i % copies);
  CK(cudaStreamEndCapture(stream, &graph));
  CK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaGraphLaunch(exec, stream));  // warm-up: every copy touched once
  std::vector<double> us;
  for (int r = 0; r < 9; ++r) {
    CK(cudaEventRecord(e0, stream));
    CK(cudaGraphLaunch(exec, stream));
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    us.push_back(1000.0 * ms / calls);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  CK(cudaGraphExecDestroy(exec));
  CK(cudaGraphDestroy(graph));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

static void bench() {
  const BenchCase cases[] = {
      {"bf16 8192x8192 static linear", 8192, 8192, kBF16, 0, false},
      {"bf16 8192x8192 static 128x4", 8192, 8192, kBF16, 1, false},
      {"bf16 8192x8192 dynamic 128x4", 8192, 8192, kBF16, 1, true},
      {"f16 8192x8192 static 128x4", 8192, 8192, kF16, 1, false},
      {"f32 8192x8192 static 128x4", 8192, 8192, kF32, 1, false},
      {"bf16 1x8192 static 8x4", 1, 8192, kBF16, 2, false},
      {"bf16 8x8192 static 8x4", 8, 8192, kBF16, 2, false},
      {"bf16 32x8192 static 8x4", 32, 8192, kBF16, 2, false},
  };
  // QDRV_CASES=1,2 (indices into the list above) narrows the run, e.g. for a profiler.
  std::vector<bool> wanted(sizeof cases / sizeof cases[0], true);
  if (const char* only = std::getenv("QDRV_CASES"); only != nullptr && *only != 0) {
    wanted.assign(wanted.size(), false);
    for (const char* q = only; *q;) {
      char* end;
      const long i = std::strtol(q, &end, 10);
      if (end == q) break;
      if (i >= 0 && i < static_cast<long>(wanted.size())) wanted[i] = true;
      for (q = end; *q == ','; ++q) {
      }
    }
  }
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<std::string> table;
  for (size_t ci = 0; ci < wanted.size(); ++ci) {
    if (!wanted[ci]) continue;
    const BenchCase& bc = cases[ci];
    const SfLayout lay = static_cast<SfLayout>(bc.layout);
    const int64_t M = bc.M, K = bc.K, C = K / 16, Rp = sf_rows(lay, M), Cp = sf_cols(lay, C);
    const int64_t in_bytes = M * K * kTypeBytes[bc.type], code_bytes = M * K / 2, sf_bytes = Rp * Cp;
    const int64_t bytes = in_bytes + code_bytes + sf_bytes;  // what the quantization moves
    auto up = [](int64_t v) { return (v + 255) / 256 * 256; };
    // Copies of the inputs (and outputs) to rotate over: more than 200 MB of
    // inputs, so that no call finds its data in the L2 cache.
    const int copies = static_cast<int>(std::max<int64_t>(3, 200000000 / in_bytes + 1));
    const int64_t in_stride = up(std::max(in_bytes, bytes)), out_stride = up(std::max(up(code_bytes) + sf_bytes, bytes));
    uint8_t *in, *out;
    float* g;
    CK(cudaMalloc(&in, in_stride * copies));
    CK(cudaMalloc(&out, out_stride * copies));
    CK(cudaMalloc(&g, 4 * copies));
    const size_t n_in = static_cast<size_t>(in_stride * copies) / kTypeBytes[bc.type];
    switch (bc.type) {
      case kF32: fill_random<<<1024, 256>>>(reinterpret_cast<float*>(in), n_in, 7); break;
      case kBF16: fill_random<<<1024, 256>>>(reinterpret_cast<__nv_bfloat16*>(in), n_in, 7); break;
      default: fill_random<<<1024, 256>>>(reinterpret_cast<__half*>(in), n_in, 7); break;
    }
    std::vector<float> hg(copies, 4.0f / (6.0f * 448.0f));  // amax 4: the inputs' largest |x| is below 8
    CK(cudaMemcpy(g, hg.data(), 4 * copies, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());

    std::vector<std::unique_ptr<Buf>> bx, bd, bs, bg;
    for (int c = 0; c < copies; ++c) {
      bx.emplace_back(new Buf(kTypeFfi[bc.type], in + c * in_stride, {M, K}));
      bd.emplace_back(new Buf(XLA_FFI_DataType_U8, out + c * out_stride, {M, K / 2}));
      bs.emplace_back(new Buf(XLA_FFI_DataType_F8E4M3FN, out + c * out_stride + up(code_bytes), {Rp, Cp}));
      bg.emplace_back(new Buf(XLA_FFI_DataType_F32, g + c, {}));
    }
    const double q_us = time_per_call_us(stream, copies, [&](int c) {
      const ffi::Error e = bc.dyn ? QuantizeDynamicImpl(stream, bx[c]->any(), bd[c]->any(), bs[c]->any(), bg[c]->any(), bc.layout)
                                  : QuantizeImpl(stream, bx[c]->any(), bg[c]->any(), bd[c]->any(), bs[c]->any(), bc.layout);
      if (e.failure()) {
        fprintf(stderr, "%s: %s\n", bc.name, e.message().c_str());
        exit(1);
      }
    });
    const double copy_us = time_per_call_us(stream, copies, [&](int c) {
      CK(cudaMemcpyAsync(out + c * out_stride, in + c * in_stride, bytes, cudaMemcpyDeviceToDevice, stream));
    });
    CK(cudaFree(in));
    CK(cudaFree(out));
    CK(cudaFree(g));
    // The copy moves 2 * bytes (read + written); the quantization `bytes`.
    const double q_gbs = bytes / q_us / 1e3, copy_gbs = 2.0 * bytes / copy_us / 1e3;
    char line[200];
    snprintf(line, sizeof line, "%-30s %9.2f %9.0f %9.2f %9.0f %7.1f%%", bc.name, q_us, q_gbs, copy_us, copy_gbs,
             100.0 * q_gbs / copy_gbs);
    printf("%s   (%.1f MB moved, %d copies)\n", line, bytes / 1e6, copies);
    table.push_back(line);
  }
  CK(cudaStreamDestroy(stream));
  printf("\n%-30s %9s %9s %9s %9s %8s\n", "case", "us", "GB/s", "copy_us", "copy_GB/s", "%copy");
  for (const std::string& l : table) printf("%s\n", l.c_str());
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  if (mode != "check" && mode != "bench") {
    fprintf(stderr, "usage: %s check [quick] | bench\n", argv[0]);
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  if (mode == "bench") {
    bench();
    return 0;
  }
  return check_all(quick) ? 1 : 0;
}
