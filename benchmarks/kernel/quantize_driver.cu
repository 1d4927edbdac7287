// Standalone driver for csrc/cuda/sm90/quantize.cu: calls the FFI handlers
// QuantizeImpl / QuantizeDynamicImpl exactly as XLA does (XLA_FFI_Buffer ->
// ffi::AnyBuffer) and compares every output byte (codes, the WHOLE padded
// scale array, dynamic g) bit for bit with the CPU handlers' (csrc/cpu/
// quantize.cc: the host reference the test suite checks against the pure-JAX
// one) on the same inputs. Small enough for compute-sanitizer. Build and run from the repository root (on a Hopper GPU):
//   FFI="$(python3 -c 'import jax.ffi as f; print(f.include_dir())')"
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I csrc/include -I "$FFI" benchmarks/kernel/quantize_driver.cu -o /tmp/qdrv
//   /tmp/qdrv check                                          (every case)
//   compute-sanitizer --tool memcheck /tmp/qdrv check
//   compute-sanitizer --tool racecheck /tmp/qdrv check quick (a subset)
#include "../../csrc/cuda/sm90/quantize.cu"
#include "../../csrc/cpu/quantize.cc"  // the reference
#include "driver_common.h"

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
};

static std::mt19937 rng(20240611);

static int64_t prod(const std::vector<int64_t>& v) { return cpu::prod(v.data(), static_cast<int>(v.size())); }

static std::string desc(const Case& c) {
  std::string s = "M=" + std::to_string(c.M) + " K=" + std::to_string(c.K) + " layout=" + std::to_string(c.layout) +
                  " " + kTypeName[c.type] + (c.dyn ? " dynamic" : " static");
  if (!c.xb.empty()) s += " x" + dims_str(c.xb) + (c.dyn ? "" : " g" + dims_str(c.gb));
  return s + (c.special ? " specials" : "");
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
  if (cs.special) {  // spec section 2's consequences; row r, block c, element i of entry 0
    const float inf = INFINITY, nan = NAN, huge = t == kF16 ? 65504.0f : 3.0e38f,
                tiny = t == kF16 ? 6.0e-8f : 1.0e-40f;  // a subnormal of each dtype
    auto at = [&](int r, int c, int i) -> int64_t { return static_cast<int64_t>(r) * K + c * 16 + i; };
    store(at(0, 0, 3), nan);  // NaN block: SF 0x7F
    store(at(0, 1, 0), inf);  // Inf: SF 448, code 6
    store(at(0, 2, 15), -inf);  // -Inf: code 0xF
    store(at(1, 0, 7), huge);  // huge: gs*vmax may overflow
    for (int i = 0; i < 16; ++i) store(at(1, 1, i), i & 1 ? -tiny : tiny);  // underflow: SF 0, codes 0/8
    for (int i = 0; i < 16; ++i) store(at(2, 0, i), i & 1 ? -0.0f : 0.0f);  // zero block, -0 keeps its sign
    store(at(2, 1, 2), nan);
    store(at(2, 1, 9), -inf);  // NaN wins over Inf
    for (int i = 0; i < 16; ++i) store(at(3, 3, i), i == 5 ? inf : tiny);
    for (int64_t i = per_entry; i < 2 * per_entry && L > 1; ++i) store(i, 0.0f);  // amax 0: dynamic g = 1
    for (int64_t i = 2 * per_entry; i < 3 * per_entry && L > 2; ++i)  // no finite value: g = 1 as well
      store(i, (i - 2 * per_entry) < K && i % 16 == 4 ? nan : (i & 1 ? inf : -inf));
  }
  // g: static, one value in [2^-6, 2^-5) per g entry (dynamic: the handlers compute it).
  const std::vector<int64_t> gdims = cs.dyn ? cs.xb : cs.gb;
  std::vector<float> g(prod(gdims));
  for (auto& v : g) v = std::ldexp(1.0f + static_cast<float>(rng() % 1000) / 1000.0f, -6);
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
  // Specials, x [3, 9, 64]: every dtype, static and dynamic, every layout.
  for (int t = 0; t < 3; ++t)
    for (int dyn = 0; dyn < 2; ++dyn) cases.push_back({9, 64, (t + dyn) % 3, t, dyn == 1, {3}, {3}, true});

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
  printf("check: %d failures of %d\n", fails, total);
  return fails;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  if (mode != "check") {
    fprintf(stderr, "usage: %s check [quick]\n", argv[0]);
    return 2;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  return check_all(quick) ? 1 : 0;
}
