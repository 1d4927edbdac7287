// Standalone driver for csrc/cuda/sm90/gemm_small_m.cu: correctness (vs a CPU
// float64 reference, plain and packed weights, W4A16 bf16/f16 and W4A4) and
// timing (CUDA events, rotating weight copies > 128 MB, vs the read-only floor).
// Build and run from the repository root (on a Hopper GPU):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -I csrc/include -I "$(python3 -c 'import jax.ffi as f; print(f.include_dir())')" \
//     benchmarks/kernel/gemm_small_m_driver.cu -o /tmp/driver
//   /tmp/driver check          /tmp/driver bench [quick]
//   /tmp/driver prefetch       (experiment: the GEMM after a 10 us idle gap in
//                               which its weight was or was not prefetched into L2)
// Tool for kernel work (one kernel, no JAX in the loop); benchmarks/gemm.py is
// the project's benchmark of record.
#include "../../csrc/cuda/sm90/gemm_small_m.cu"
#include "../../csrc/cuda/bench_stream.cu"
#include "driver_common.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace jaxfp4;
using namespace jaxfp4::sm90_gemm;

// ---- packing (mirror of jaxfp4/packing.py) ----
static const int kSB[4] = {13, 12, 15, 14};
static void pack_cpu(const std::vector<uint8_t>& data, const std::vector<uint8_t>& sf_lin, int N, int K,
                     std::vector<uint8_t>* pd, std::vector<uint8_t>* ps) {
  const int T = (N + 15) / 16, Q = (K + 63) / 64, Kp = 64 * Q, C = K / 16;
  pd->assign(static_cast<size_t>(T) * 8 * Kp, 0);
  ps->assign(static_cast<size_t>(T) * Kp, 0);
  auto code = [&](int n, int k) -> uint32_t {
    if (n >= N || k >= K) return 0;
    const uint8_t b = data[static_cast<size_t>(n) * (K / 2) + k / 2];
    return (k & 1) ? (b >> 4) : (b & 15);
  };
  for (int tile = 0; tile < T; ++tile)
    for (int c = 0; c < Q; ++c)
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int r = 0; r < 2; ++r) {
          const int n = 16 * tile + 8 * r + g, blk = 4 * c + t;
          (*ps)[static_cast<size_t>(tile) * Kp + c * 64 + 2 * l + r] =
              (n < N && blk < C) ? sf_lin[static_cast<size_t>(n) * C + blk] : 0;
          for (int h = 0; h < 2; ++h) {
            uint32_t w = 0;
            for (int i = 0; i < 8; ++i) {
              const int p = i / 2, f = i % 2;
              const uint32_t q = code(n, 64 * c + 16 * t + 8 * h + i);
              w |= (q & 7) << (16 * f + 3 * p);
              w |= (q >> 3) << (16 * f + kSB[p]);
            }
            memcpy(&(*pd)[static_cast<size_t>(tile) * 8 * Kp + c * 512 + l * 16 + (2 * r + h) * 4], &w, 4);
          }
        }
      }
}

static std::mt19937_64 rng(1234);
static uint8_t rand_sf() {  // finite, non-negative, incl. subnormals and 0 (rarely)
  const uint32_t r = rng() % 1000;
  if (r == 0) return 0;
  if (r < 20) return static_cast<uint8_t>(1 + rng() % 7);  // subnormal
  return static_cast<uint8_t>(0x20 + rng() % 0x40);        // 2^-3 .. ~2^5 roughly
}

struct Case {
  int M, N, K;
  int mode;  // 0 w4a16 bf16, 1 w4a16 f16, 2 w4a4, 3 w4a4 from bf16 quantized in the kernel (packed, M <= 8),
             // 4 w4a16 bf16 with the RMSNorm prologue, 5 with the SwiGLU prologue (packed, M <= 8, La = Lb = 1),
             // 6, 7: those prologues then the in-kernel quantization (W4A4; inputs whose prologue
             // values are exact in float32, so the result is checked bit for bit, as mode 3's)
  bool packed;
  int b_layout, a_layout;
  int out_type;
  int La, Lb;  // batch (1-D leading axis, broadcast when 1)
  bool residual = false;  // bf16 out, La = Lb = 1: also run with a residual, bit for bit the rounded sum
};

static bool run_case(const Case& cs, bool verbose) {
  const int M = cs.M, N = cs.N, K = cs.K, C = K / 16;
  const int L = std::max(cs.La, cs.Lb);
  const SfLayout bl = static_cast<SfLayout>(cs.b_layout), al = static_cast<SfLayout>(cs.a_layout);
  // weights
  std::vector<std::vector<uint8_t>> bdata(cs.Lb), bsf_lin(cs.Lb);
  std::vector<float> bg(cs.Lb), ag(cs.La);
  for (int l = 0; l < cs.Lb; ++l) {
    bdata[l].resize(static_cast<size_t>(N) * K / 2);
    for (auto& x : bdata[l]) x = static_cast<uint8_t>(rng());
    bsf_lin[l].resize(static_cast<size_t>(N) * C);
    for (auto& x : bsf_lin[l]) x = rand_sf();
    bg[l] = std::ldexp(1.0f + (rng() % 100) / 100.0f, -10);
  }
  // activations (modes 4-7: the prologue's input, [M, K] or [M, 2K], and the RMSNorm weight)
  const bool fused = cs.mode >= 4, rms = cs.mode == 4 || cs.mode == 6, quantized = cs.mode == 3 || cs.mode >= 6;
  const int Ka = rms || !fused ? K : 2 * K;
  std::vector<uint16_t> norm_w(K);
  for (auto& x : norm_w) x = float_to_bf16(0.5f + (rng() % 1000) / 1000.0f);
  // Mode 6: eps 0 and rows of +-2^e, so the norm's values are exactly +-w; mode 7:
  // gates in [17, 120], where sigmoid rounds to 1 in float32: silu(gate) * up = gate * up.
  const float norm_eps = cs.mode == 6 ? 0.0f : 1e-5f;
  std::vector<std::vector<uint16_t>> a16(cs.La);
  std::vector<std::vector<uint8_t>> adata(cs.La), asf_lin(cs.La);
  for (int l = 0; l < cs.La; ++l) {
    ag[l] = std::ldexp(1.0f + (rng() % 100) / 100.0f, -3);
    if (cs.mode == 2) {
      adata[l].resize(static_cast<size_t>(M) * K / 2);
      for (auto& x : adata[l]) x = static_cast<uint8_t>(rng());
      asf_lin[l].resize(static_cast<size_t>(M) * C);
      for (auto& x : asf_lin[l]) x = rand_sf();
    } else {
      a16[l].resize(static_cast<size_t>(M) * Ka);
      std::normal_distribution<float> nd(0.f, 1.f);
      for (auto& x : a16[l]) {
        const float v = nd(rng) * std::ldexp(1.0f, static_cast<int>(rng() % 7) - 3);
        x = cs.mode == 1 ? float_to_f16(v) : float_to_bf16(v);
      }
      for (int m = 0; m < M && cs.mode == 6; ++m) {
        const float c = std::ldexp(1.0f, static_cast<int>(rng() % 9) - 4);
        for (int k = 0; k < K; ++k) a16[l][static_cast<size_t>(m) * K + k] = float_to_bf16(rng() & 1 ? c : -c);
      }
      for (int m = 0; m < M && cs.mode == 7; ++m)
        for (int k = 0; k < K; ++k)
          a16[l][static_cast<size_t>(m) * Ka + k] = float_to_bf16(17.0f + static_cast<float>(rng() % 1030) / 10.0f);
    }
  }
  // modes 4-7: the prologue's bf16 values in float64, rounded once (the kernel's
  // float32 may round a value the other way near a tie: one bf16 ulp of one term,
  // far inside the tolerance for K >= 256)
  std::vector<uint16_t> staged;
  if (fused) {
    staged.resize(static_cast<size_t>(M) * K);
    for (int m = 0; m < M; ++m) {
      const uint16_t* row = &a16[0][static_cast<size_t>(m) * Ka];
      double ss = 0;
      for (int k = 0; k < K; ++k) ss += static_cast<double>(bf16_to_float(row[k])) * bf16_to_float(row[k]);
      const double rstd = 1.0 / std::sqrt(ss / K + norm_eps);
      for (int k = 0; k < K; ++k) {
        const double x = bf16_to_float(row[k]);
        const double v = rms ? x * rstd * bf16_to_float(norm_w[k])
                                      : x / (1.0 + std::exp(-x)) * bf16_to_float(row[K + k]);
        staged[static_cast<size_t>(m) * K + k] = float_to_bf16(static_cast<float>(v));
      }
    }
  }
  // modes 3, 6, 7: the activations (6, 7: the prologue's values) quantized on the
  // host (format.h, as jaxfp4.quantize with g = ag): codes (plain nibble order),
  // LINEAR scales, and their values
  std::vector<std::vector<uint8_t>> qdata(cs.La), qsf(cs.La);
  std::vector<std::vector<double>> qval(cs.La);
  if (quantized) {
    for (int l = 0; l < cs.La; ++l) {
      qdata[l].assign(static_cast<size_t>(M) * K / 2, 0);
      qsf[l].assign(static_cast<size_t>(M) * C, 0);
      qval[l].assign(static_cast<size_t>(M) * K, 0.0);
      const float gs = 1.0f / ag[l];
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < C; ++c) {
          float x[16], vmax = 0.0f;
          for (int i = 0; i < 16; ++i) {
            x[i] = bf16_to_float((fused ? staged : a16[l])[static_cast<size_t>(m) * K + 16 * c + i]);
            vmax = nan_max_abs(vmax, x[i]);
          }
          const uint8_t sf = block_scale(vmax, gs);
          const float os = block_output_scale(sf, gs);
          qsf[l][static_cast<size_t>(m) * C + c] = sf;
          for (int i = 0; i < 16; ++i) {
            const uint32_t q = e2m1_encode(x[i] * os);
            const size_t k = static_cast<size_t>(m) * K + 16 * c + i;
            qdata[l][k / 2] |= static_cast<uint8_t>(q << (4 * (k & 1)));
            qval[l][k] = static_cast<double>(e2m1_decode(q)) * e4m3_decode(sf);
          }
        }
    }
  }
  // reference (float64)
  auto wval = [&](int l, int n, int k) {
    const uint8_t b = bdata[l][static_cast<size_t>(n) * (K / 2) + k / 2];
    return static_cast<double>(e2m1_decode((k & 1) ? b >> 4 : b & 15)) *
           e4m3_decode(bsf_lin[l][static_cast<size_t>(n) * C + k / 16]);
  };
  auto aval = [&](int l, int m, int k) -> double {
    if (cs.mode == 2) {
      const uint8_t b = adata[l][static_cast<size_t>(m) * (K / 2) + k / 2];
      return static_cast<double>(e2m1_decode((k & 1) ? b >> 4 : b & 15)) *
             e4m3_decode(asf_lin[l][static_cast<size_t>(m) * C + k / 16]);
    }
    if (quantized) return qval[l][static_cast<size_t>(m) * K + k];
    if (fused) return static_cast<double>(bf16_to_float(staged[static_cast<size_t>(m) * K + k]));
    const uint16_t v = a16[l][static_cast<size_t>(m) * K + k];
    return cs.mode == 1 ? f16_to_float(v) : bf16_to_float(v);
  };
  std::vector<double> ref(static_cast<size_t>(L) * M * N), absref(ref.size());
  for (int z = 0; z < L; ++z) {
    const int la = cs.La == 1 ? 0 : z, lb = cs.Lb == 1 ? 0 : z;
    const double gg = cs.mode == 2 || quantized ? static_cast<double>(ag[la] * bg[lb]) : bg[lb];
    std::vector<double> wrow(K);
    for (int n = 0; n < N; ++n) {
      for (int k = 0; k < K; ++k) wrow[k] = wval(lb, n, k);
      for (int m = 0; m < M; ++m) {
        double s = 0, sa = 0;
        for (int k = 0; k < K; ++k) {
          const double t = aval(la, m, k) * wrow[k];
          s += t;
          sa += std::fabs(t);
        }
        ref[(static_cast<size_t>(z) * M + m) * N + n] = s * gg;
        absref[(static_cast<size_t>(z) * M + m) * N + n] = sa * std::fabs(gg);
      }
    }
  }
  // device buffers
  std::vector<uint8_t> hb, hbs;
  int64_t b_stride, bs_stride;
  for (int l = 0; l < cs.Lb; ++l) {
    std::vector<uint8_t> d, s;
    if (cs.packed) {
      pack_cpu(bdata[l], bsf_lin[l], N, K, &d, &s);
    } else {
      d = bdata[l];
      s.assign(sf_rows(bl, N) * sf_cols(bl, C), 0);
      for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c) s[sf_offset(bl, n, c, C)] = bsf_lin[l][static_cast<size_t>(n) * C + c];
    }
    b_stride = d.size();
    bs_stride = s.size();
    hb.insert(hb.end(), d.begin(), d.end());
    hbs.insert(hbs.end(), s.begin(), s.end());
  }
  std::vector<uint8_t> ha, has;
  int64_t a_stride = 0, as_stride = 0;
  for (int l = 0; l < cs.La; ++l) {
    if (cs.mode == 2) {
      std::vector<uint8_t> s(sf_rows(al, M) * sf_cols(al, C), 0);
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < C; ++c) s[sf_offset(al, m, c, C)] = asf_lin[l][static_cast<size_t>(m) * C + c];
      a_stride = adata[l].size();
      as_stride = s.size();
      ha.insert(ha.end(), adata[l].begin(), adata[l].end());
      has.insert(has.end(), s.begin(), s.end());
    } else {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(a16[l].data());
      a_stride = a16[l].size();
      ha.insert(ha.end(), p, p + a16[l].size() * 2);
    }
  }
  uint8_t *db, *dbs, *da, *das = nullptr;
  float *dbg, *dag;
  void* dout;
  const int osz = cs.out_type == kOutF32 ? 4 : 2;
  const size_t out_bytes = static_cast<size_t>(L) * M * N * osz;
  CK(cudaMalloc(&db, hb.size() + 16));
  CK(cudaMalloc(&dbs, hbs.size() + 16));
  CK(cudaMalloc(&da, ha.size() + 16));
  if (!has.empty()) CK(cudaMalloc(&das, has.size()));
  CK(cudaMalloc(&dbg, 4 * cs.Lb));
  CK(cudaMalloc(&dag, 4 * cs.La));
  CK(cudaMalloc(&dout, out_bytes));
  CK(cudaMemcpy(db, hb.data(), hb.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbs, hbs.data(), hbs.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(da, ha.data(), ha.size(), cudaMemcpyHostToDevice));
  if (das) CK(cudaMemcpy(das, has.data(), has.size(), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dbg, bg.data(), 4 * cs.Lb, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dag, ag.data(), 4 * cs.La, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout, 0xFF, out_bytes));  // NaN poison
  uint16_t* dnorm;
  CK(cudaMalloc(&dnorm, 2 * K));
  CK(cudaMemcpy(dnorm, norm_w.data(), 2 * K, cudaMemcpyHostToDevice));
  Launch Lc;
  Lc.p.a = da;
  Lc.p.a_sf = das;
  Lc.p.a_g = dag;
  Lc.p.b = db;
  Lc.p.b_sf = dbs;
  Lc.p.b_g = dbg;
  Lc.p.out = dout;
  Lc.p.out_type = cs.out_type;
  Lc.p.a_sf_layout = cs.a_layout;
  Lc.p.b_sf_layout = cs.b_layout;
  Lc.p.a_stride = a_stride;
  Lc.p.a_sf_stride = as_stride;
  Lc.p.b_stride = b_stride;
  Lc.p.b_sf_stride = bs_stride;
  Lc.p.a_sf_cstride = sf_offset(al, 0, 4, C) - sf_offset(al, 0, 0, C);
  Lc.p.b_sf_cstride = sf_offset(bl, 0, 4, C) - sf_offset(bl, 0, 0, C);
  const int64_t ad[1] = {cs.La}, bd[1] = {cs.Lb};
  make_batch_map(ad, bd, 1, &Lc.p.map);
  Lc.batch = L;
  Lc.f16 = cs.mode == 1;
  Lc.a4 = cs.mode == 2;
  Lc.packed = cs.packed;
  Lc.qa = cs.mode == 3;
  Lc.p.prologue = !fused ? kPrologueNone : rms ? kPrologueRmsNorm : kPrologueSwiGlu;
  if (fused && !quantized) Lc.p.a_g = nullptr;  // W4A16: the fused kernel's W4A4 flag is a_g
  Lc.p.norm_w = reinterpret_cast<const __nv_bfloat16*>(dnorm);
  Lc.p.eps = norm_eps;
  ffi::Error e = finish(Lc, M, N, K, 0);
  if (e.failure()) {
    printf("launch failed\n");
    return false;
  }
  CK(cudaDeviceSynchronize());
  std::vector<uint8_t> hout(out_bytes);
  CK(cudaMemcpy(hout.data(), dout, out_bytes, cudaMemcpyDeviceToHost));
  const char* kernel = jaxfp4::g_last_kernel;
  bool same_as_w4a4 = true;  // mode 3: bit for bit what quantize-then-W4A4 gives (8x4 activation scales)
  if (quantized) {
    std::vector<uint8_t> qd, qs;
    for (int l = 0; l < cs.La; ++l) {
      std::vector<uint8_t> s8(sf_rows(SfLayout::kSwizzled8x4, M) * sf_cols(SfLayout::kSwizzled8x4, C), 0);
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < C; ++c) s8[sf_offset(SfLayout::kSwizzled8x4, m, c, C)] = qsf[l][static_cast<size_t>(m) * C + c];
      qd.insert(qd.end(), qdata[l].begin(), qdata[l].end());
      qs.insert(qs.end(), s8.begin(), s8.end());
    }
    uint8_t *dqd, *dqs;
    void* dout2;
    CK(cudaMalloc(&dqd, qd.size() + 16));
    CK(cudaMalloc(&dqs, qs.size() + 16));
    CK(cudaMalloc(&dout2, out_bytes));
    CK(cudaMemcpy(dqd, qd.data(), qd.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dqs, qs.data(), qs.size(), cudaMemcpyHostToDevice));
    CK(cudaMemset(dout2, 0xFF, out_bytes));
    Launch L4 = Lc;
    L4.qa = false;
    L4.p.prologue = kPrologueNone;
    L4.a4 = true;
    L4.p.a = dqd;
    L4.p.a_sf = dqs;
    L4.p.out = dout2;
    L4.p.a_sf_layout = static_cast<int>(SfLayout::kSwizzled8x4);
    L4.p.a_stride = static_cast<int64_t>(M) * K / 2;
    L4.p.a_sf_stride = static_cast<int64_t>(qs.size() / cs.La);
    L4.p.a_sf_cstride = sf_offset(SfLayout::kSwizzled8x4, 0, 4, C) - sf_offset(SfLayout::kSwizzled8x4, 0, 0, C);
    if (finish(L4, M, N, K, 0).failure()) return false;
    std::vector<uint8_t> hout2(out_bytes);
    CK(cudaMemcpy(hout2.data(), dout2, out_bytes, cudaMemcpyDeviceToHost));
    same_as_w4a4 = hout2 == hout;
    if (!same_as_w4a4) printf("   in-kernel quantization differs from quantize + W4A4\n");
    cudaFree(dqd);
    cudaFree(dqs);
    cudaFree(dout2);
  }
  bool same_sum = true;  // residual: bf16(bf16 product + residual), bit for bit
  if (cs.residual) {
    std::vector<uint16_t> res(static_cast<size_t>(M) * N);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto& x : res) x = float_to_bf16(nd(rng));
    void *dres, *dout3;
    CK(cudaMalloc(&dres, res.size() * 2));
    CK(cudaMalloc(&dout3, out_bytes));
    CK(cudaMemcpy(dres, res.data(), res.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemset(dout3, 0xFF, out_bytes));
    Launch Lr = Lc;
    Lr.p.out = dout3;
    Lr.p.residual = static_cast<const __nv_bfloat16*>(dres);
    if (finish(Lr, M, N, K, 0).failure()) return false;
    std::vector<uint16_t> plain(res.size()), summed(res.size());
    CK(cudaMemcpy(plain.data(), dout, out_bytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(summed.data(), dout3, out_bytes, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < res.size() && same_sum; ++i)
      same_sum = summed[i] == float_to_bf16(bf16_to_float(plain[i]) + bf16_to_float(res[i]));
    if (!same_sum) printf("   the residual's sum differs from the rounded product plus the residual\n");
    cudaFree(dres);
    cudaFree(dout3);
  }
  const double eps = cs.out_type == kOutF32 ? std::ldexp(1.0, -24) : (cs.out_type == kOutBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11));
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    double o;
    if (cs.out_type == kOutF32) {
      float f;
      memcpy(&f, &hout[i * 4], 4);
      o = f;
    } else {
      uint16_t h;
      memcpy(&h, &hout[i * 2], 2);
      o = cs.out_type == kOutBF16 ? bf16_to_float(h) : f16_to_float(h);
    }
    const double sub = cs.out_type == kOutF16 ? std::ldexp(1.0, -25) : (cs.out_type == kOutBF16 ? std::ldexp(1.0, -134) : std::ldexp(1.0, -150));
    const double tol = absref[i] * K * std::ldexp(1.0, -23) + std::fabs(ref[i]) * eps + sub;
    const double err = std::fabs(o - ref[i]);
    if (!(err <= tol)) {
      if (bad < 3 && verbose)
        printf("   bad at %zu: got %g want %g (tol %g)\n", i, o, ref[i], tol);
      ++bad;
    }
    if (ref[i] != 0) worst = std::max(worst, err / (absref[i] + 1e-300));
  }
  printf("%s M=%d N=%d K=%d mode=%d packed=%d bl=%d al=%d out=%d La=%d Lb=%d res=%d: %s (worst err/sum|t| %.2e) %s\n",
         bad || !same_sum ? "FAIL" : "ok  ", M, N, K, cs.mode, cs.packed, cs.b_layout, cs.a_layout, cs.out_type,
         cs.La, cs.Lb, cs.residual ? 1 : 0, bad ? "mismatch" : "pass", worst, kernel);
  cudaFree(dnorm);
  cudaFree(db);
  cudaFree(dbs);
  cudaFree(da);
  if (das) cudaFree(das);
  cudaFree(dbg);
  cudaFree(dag);
  cudaFree(dout);
  return bad == 0 && same_as_w4a4 && same_sum;
}

static int check_all(bool quick) {
  int fails = 0;
  std::vector<Case> cases;
  const int Ms[] = {1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24, 31, 32, 33, 64, 127, 129};
  int i = 0;
  for (int M : Ms) {
    for (int packed = 0; packed < 2; ++packed) {
      const int Ks[] = {16, 48, 272, 1024};
      const int Ns[] = {200, 16, 1000, 37};
      Case c{M, Ns[i % 4], Ks[i % 4], i % 3, packed == 1, (i / 2) % 3, (i / 3) % 3, (i / 5) % 3, 1, 1};
      cases.push_back(c);
      ++i;
    }
  }
  // big-ish
  cases.push_back({1, 4096, 4096, 0, true, 1, 0, kOutBF16, 1, 1});
  cases.push_back({8, 4096, 4096, 0, false, 1, 0, kOutF32, 1, 1});
  cases.push_back({32, 1000, 4096, 0, true, 0, 0, kOutF32, 1, 1});
  cases.push_back({4, 1000, 4096, 1, true, 0, 0, kOutF16, 1, 1});
  cases.push_back({4, 1000, 4096, 2, true, 0, 2, kOutF32, 1, 1});
  cases.push_back({20, 1000, 4096, 2, false, 1, 1, kOutF32, 1, 1});
  // batched / broadcast
  cases.push_back({3, 200, 272, 0, true, 1, 0, kOutF32, 3, 1});
  cases.push_back({3, 200, 272, 0, false, 0, 0, kOutF32, 1, 3});
  cases.push_back({9, 200, 272, 2, true, 1, 2, kOutBF16, 3, 3});
  cases.push_back({9, 200, 272, 1, false, 1, 2, kOutF16, 2, 1});
  // K whose chunk runs fill few warps exactly (11008: 86 runs of 2 chunks, 15
  // consumers and a ragged last item; 18944: 148 runs), W4A16 and W4A4 packed
  cases.push_back({1, 40, 11008, 0, true, 0, 0, kOutF32, 1, 1});
  cases.push_back({16, 40, 11008, 0, true, 1, 0, kOutF32, 1, 1});
  cases.push_back({5, 24, 18944, 2, true, 0, 2, kOutF32, 1, 1});
  // W4A4 with the activations quantized in the kernel (packed, M <= 8): vs the
  // reference and bit for bit vs quantize + W4A4; ragged K, a short last item,
  // batched, the largest K for M = 2 (2 * 20480 * 2 bytes)
  cases.push_back({1, 200, 4096, 3, true, 0, 0, kOutBF16, 1, 1});
  cases.push_back({8, 1000, 272, 3, true, 1, 0, kOutF32, 1, 1});
  cases.push_back({3, 37, 11008, 3, true, 2, 0, kOutF32, 1, 1});
  cases.push_back({3, 200, 1040, 3, true, 0, 0, kOutF16, 3, 1});
  cases.push_back({2, 16, 20416, 3, true, 0, 0, kOutF32, 1, 1});
  // W4A16 with a fused prologue (packed, M <= 8), with and without a residual; the
  // residual alone on the ordinary kernels (plain and packed, M up to 32)
  cases.push_back({1, 200, 4096, 4, true, 0, 0, kOutBF16, 1, 1, true});
  cases.push_back({8, 1000, 272, 4, true, 1, 0, kOutF32, 1, 1});
  cases.push_back({3, 37, 11008, 4, true, 2, 0, kOutBF16, 1, 1, true});
  cases.push_back({1, 4096, 14336, 5, true, 0, 0, kOutBF16, 1, 1, true});
  cases.push_back({2, 200, 14336, 5, true, 1, 0, kOutBF16, 1, 1});
  cases.push_back({7, 1000, 272, 5, true, 0, 0, kOutF32, 1, 1});
  cases.push_back({3, 200, 272, 0, false, 1, 0, kOutBF16, 1, 1, true});
  cases.push_back({17, 200, 1024, 0, true, 0, 0, kOutBF16, 1, 1, true});
  cases.push_back({32, 1000, 272, 0, true, 2, 0, kOutBF16, 1, 1, true});
  // ... and then quantized in the kernel (W4A4), bit for bit vs quantize + W4A4
  cases.push_back({1, 200, 4096, 6, true, 0, 0, kOutBF16, 1, 1, true});
  cases.push_back({8, 1000, 272, 6, true, 1, 0, kOutF32, 1, 1});
  cases.push_back({2, 4096, 14336, 7, true, 0, 0, kOutBF16, 1, 1, true});
  cases.push_back({5, 37, 1040, 7, true, 2, 0, kOutF32, 1, 1});
  if (quick) {  // the first 6 general cases and the first fused ones
    std::vector<Case> q(cases.begin(), cases.begin() + 6);
    for (const Case& c : cases)
      if (c.mode >= 4 && q.size() < 10) q.push_back(c);
    cases = q;
  }
  // Consumer warps per group (runs of chunks -> warps): fewest items, then fewest warps.
  const int64_t nc_table[][3] = {{32, 16, 16}, {64, 16, 16}, {112, 16, 16}, {86, 16, 15}, {148, 16, 15},
                                 {43, 16, 15}, {24, 16, 12}, {8, 16, 8}, {1, 16, 1}, {17, 16, 9}};
  for (const auto& r : nc_table) {
    if (packed_consumers(r[0], r[1]) != r[2]) {
      printf("FAIL packed_consumers(%lld, %lld) = %lld, want %lld\n", static_cast<long long>(r[0]),
             static_cast<long long>(r[1]), static_cast<long long>(packed_consumers(r[0], r[1])),
             static_cast<long long>(r[2]));
      ++fails;
    }
  }
  for (const Case& c : cases) fails += !run_case(c, true);
  printf("check: %d failures of %zu\n", fails, cases.size());
  return fails;
}

// ---- benchmark ----
__global__ void fill_kernel(uint8_t* p, size_t n, uint64_t seed, int mode) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = mix_hash(i, seed);
    uint8_t v = static_cast<uint8_t>(h);
    if (mode == 1) v = 0x28 + (v & 0x1F);  // scales: finite, moderate
    p[i] = v;
  }
}
__global__ void fill_bf16(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31;
    p[i] = 0x3C00 + static_cast<uint16_t>(h & 0x3FF) + ((h >> 12) & 1 ? 0x8000 : 0);
  }
}

// Distinct copies of a packed weight (T tiles, Kp padded K) filled with random
// bytes: at least 3 and more than `min_bytes` in all, so that the timed loop
// reads them from DRAM.
struct WeightCopies {
  std::vector<uint8_t*> W, S;
  size_t wbytes, sbytes;
  WeightCopies(int T, int Kp, size_t min_bytes)
      : wbytes(static_cast<size_t>(T) * 8 * Kp), sbytes(static_cast<size_t>(T) * Kp) {
    const int n = std::max<int>(3, static_cast<int>(min_bytes / (wbytes + sbytes)) + 1);
    W.resize(n);
    S.resize(n);
    for (int c = 0; c < n; ++c) {
      CK(cudaMalloc(&W[c], wbytes));
      CK(cudaMalloc(&S[c], sbytes));
      fill_kernel<<<1024, 256>>>(W[c], wbytes, 77 + c, 0);
      fill_kernel<<<1024, 256>>>(S[c], sbytes, 99 + c, 1);
    }
  }
  ~WeightCopies() {
    for (size_t c = 0; c < W.size(); ++c) {
      cudaFree(W[c]);
      cudaFree(S[c]);
    }
  }
  int count() const { return static_cast<int>(W.size()); }
};

// The timing modes' bf16 activations (`rows` x K, random), decode scale (1/64)
// and output (rows x N float32-sized).
struct BenchIo {
  uint16_t* A = nullptr;
  float* g = nullptr;
  void* out = nullptr;
  BenchIo(int rows, int K, int N) {
    CK(cudaMalloc(&A, static_cast<size_t>(rows) * K * 2));
    fill_bf16<<<256, 256>>>(A, static_cast<size_t>(rows) * K, 5);
    CK(cudaMalloc(&g, 4));
    const float one = 1.0f / 64;
    CK(cudaMemcpy(g, &one, 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&out, static_cast<size_t>(rows) * N * 4));
  }
  ~BenchIo() {
    cudaFree(A);
    cudaFree(g);
    cudaFree(out);
  }
};

struct BenchShape {
  int N, K;
};

// Comma-separated integers from the environment (e.g. DRV_MS=1,8,16), or `fallback`.
static std::vector<int> env_ints(const char* name, std::vector<int> fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  std::vector<int> out;
  for (const char* q = v; *q;) {
    out.push_back(static_cast<int>(std::strtol(q, const_cast<char**>(&q), 10)));
    while (*q == ',' || *q == 'x') ++q;
  }
  return out;
}

// Shapes, M values and kinds can be narrowed for experiments:
// DRV_SHAPES=6144x4096,28672x4096 DRV_MS=1,16 DRV_KINDS=0,2.
static void bench(bool quick) {
  std::vector<BenchShape> shapes;
  const std::vector<int> sv = env_ints("DRV_SHAPES", {28672, 4096, 8192, 8192, 4096, 4096, 4096, 14336});
  for (size_t i = 0; i + 1 < sv.size(); i += 2) shapes.push_back({sv[i], sv[i + 1]});
  const std::vector<int> Ms = env_ints("DRV_MS", {1, 2, 4, 8, 16, 32});
  const std::vector<int> kinds = env_ints("DRV_KINDS", {0, 1, 2, 3});
  // DRV_READY=1: launches as a chain's later links (Params::weights_ready: copies before the wait)
  const bool ready = env_ints("DRV_READY", {0})[0] == 1;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  float* dsum;
  CK(cudaMalloc(&dsum, 4));
  printf("\n%-12s %-22s %4s %9s %9s %7s\n", "shape", "kernel", "M", "us", "floor_us", "%floor");
  std::vector<std::string> table;
  for (const BenchShape& s : shapes) {
    const int N = s.N, K = s.K, C = K / 16;
    const int T = (N + 15) / 16, Kp = (K + 63) / 64 * 64;
    const WeightCopies wc(T, Kp, 160ull << 20);
    const size_t wbytes = wc.wbytes, sbytes = wc.sbytes, per = wbytes + sbytes;
    const int copies = wc.count();
    const std::vector<uint8_t*>&W = wc.W, &S = wc.S;
    // one contiguous buffer per copy for the floor: data + scales read separately
    const BenchIo io(32, K, N);
    uint16_t* const A = io.A;
    float* const dg = io.g;
    void* const out = io.out;
    uint8_t *A4, *A4s;
    CK(cudaMalloc(&A4, static_cast<size_t>(32) * K / 2));
    CK(cudaMalloc(&A4s, static_cast<size_t>(128) * C + 64));
    fill_kernel<<<256, 256>>>(A4, static_cast<size_t>(32) * K / 2, 3, 0);
    fill_kernel<<<256, 256>>>(A4s, static_cast<size_t>(128) * C + 64, 4, 1);
    uint16_t* norm_w;  // kinds 5, 7: the RMSNorm weight (bf16 ones)
    CK(cudaMalloc(&norm_w, static_cast<size_t>(K) * 2));
    {
      std::vector<uint16_t> ones(K, 0x3F80);
      CK(cudaMemcpy(norm_w, ones.data(), ones.size() * 2, cudaMemcpyHostToDevice));
    }
    CK(cudaDeviceSynchronize());
    const int iters = std::max(6 * copies, 60);
    // floor: stream data + scales of each copy
    auto floor_us = [&]() {
      auto one_pass = [&](int c) {
        const int64_t n16 = static_cast<int64_t>(wbytes) / 16;
        int64_t blocks = std::min<int64_t>((n16 + 511) / 512, static_cast<int64_t>(jaxfp4::sm_count()) * 2);
        stream_read_kernel<<<static_cast<unsigned>(blocks), 512>>>(W[c], static_cast<int64_t>(wbytes), dsum, 0);
        const int64_t s16 = static_cast<int64_t>(sbytes) / 16;
        blocks = std::min<int64_t>((s16 + 511) / 512, static_cast<int64_t>(jaxfp4::sm_count()) * 2);
        stream_read_kernel<<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), 512>>>(
            S[c], static_cast<int64_t>(sbytes), dsum, 0);
      };
      for (int i = 0; i < copies; ++i) one_pass(i);
      CK(cudaEventRecord(e0));
      for (int i = 0; i < iters; ++i) one_pass(i % copies);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      return ms * 1000 / iters;
    };
    // single contiguous stream over data+scales-sized buffer (one launch): a tighter floor
    auto floor1_us = [&]() {
      for (int i = 0; i < copies; ++i) {
        const int64_t n16 = static_cast<int64_t>(wbytes) / 16;
        stream_read_kernel<<<static_cast<unsigned>(std::min<int64_t>((n16 + 511) / 512, jaxfp4::sm_count() * 2)), 512>>>(
            W[i], static_cast<int64_t>(wbytes), dsum, 0);
      }
      CK(cudaEventRecord(e0));
      for (int i = 0; i < iters; ++i) {
        const int64_t n16 = static_cast<int64_t>(wbytes) / 16;
        stream_read_kernel<<<static_cast<unsigned>(std::min<int64_t>((n16 + 511) / 512, jaxfp4::sm_count() * 2)), 512>>>(
            W[i % copies], static_cast<int64_t>(wbytes), dsum, 0);
      }
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      return ms * 1000 / iters * static_cast<float>(per) / static_cast<float>(wbytes);
    };
    const float fl2 = floor_us();
    const float fl = floor1_us();
    printf("N=%d K=%d: %.1f MB/copy, %d copies; floor (1 stream, scaled to data+scales) %.2f us, (2 streams) %.2f us\n",
           N, K, per / 1e6, copies, fl, fl2);
    for (int kind : kinds) {
      // 0 packed bf16, 1 plain bf16 (linear scales), 2 packed w4a4 (8x4 act scales), 3 plain 128x4 bf16,
      // 4 packed w4a4 quantizing bf16 activations in the kernel (M <= 8); packed bf16 with
      // 5 the RMSNorm prologue (M <= 8), 6 the SwiGLU epilogue, 7 both (the decode's gate_up)
      if (quick && kind >= 2) continue;
      if (kind == 3 && N != 28672) continue;
      for (int M : Ms) {
        if (kind == 2 && (M == 2 || M == 16)) continue;
        if ((kind == 4 || kind == 5 || kind == 7) && (M > 8 || std::min(M, 8) * qa_row_bytes(K) > kQaMaxBytes))
          continue;
        Launch L;
        L.p.a = kind == 2 ? static_cast<const void*>(A4) : static_cast<const void*>(A);
        L.p.a_sf = A4s;
        L.p.a_g = dg;
        L.p.b_g = dg;
        L.p.out = out;
        L.p.out_type = kOutBF16;
        L.p.a_sf_layout = 2;
        L.p.b_sf_layout = kind == 3 ? 1 : 0;
        const SfLayout al = SfLayout::kSwizzled8x4;
        L.p.a_sf_cstride = sf_offset(al, 0, 4, C) - sf_offset(al, 0, 0, C);
        const SfLayout bl = static_cast<SfLayout>(L.p.b_sf_layout);
        L.p.b_sf_cstride = sf_offset(bl, 0, 4, C) - sf_offset(bl, 0, 0, C);
        const int64_t d1[1] = {1};
        make_batch_map(d1, d1, 0, &L.p.map);
        L.batch = 1;
        L.f16 = false;
        L.a4 = kind == 2;
        L.qa = kind == 4;
        L.packed = kind == 0 || kind == 2 || kind >= 4;
        if (kind >= 5) L.p.a_g = nullptr;  // W4A16 (a_g set: the staged rows would be quantized, W4A4)
        if (kind == 5 || kind == 7) {
          L.p.prologue = kPrologueRmsNorm;
          L.p.norm_w = reinterpret_cast<const __nv_bfloat16*>(norm_w);
          L.p.eps = 1e-5f;
        }
        if (kind == 6 || kind == 7) L.p.epilogue = kEpilogueSwiGluInterleaved;
        L.p.weights_ready = ready ? 1 : 0;  // (safe here: nothing writes the weights)
        auto go = [&](int c) {
          L.p.b = W[c];
          L.p.b_sf = S[c];
          ffi::Error e = finish(L, M, N, K, 0);
          if (e.failure()) {
            printf("launch failure\n");
            exit(1);
          }
        };
        for (int i = 0; i < copies; ++i) go(i);
        CK(cudaGetLastError());
        CK(cudaEventRecord(e0));
        for (int i = 0; i < iters; ++i) go(i % copies);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        const float us = ms * 1000 / iters;
        const char* kn[] = {"w4a16 bf16 packed", "w4a16 bf16 plain lin", "w4a4 packed (a 8x4)", "w4a16 plain 128x4",
                            "w4a4 packed, quantize a", "w4a16 packed rms_norm", "w4a16 packed swiglu_out",
                            "w4a16 rms_norm+swiglu"};
        char line[256];
        snprintf(line, sizeof line, "%5dx%-6d %-22s %4d %9.2f %9.2f %6.1f%%", N, K, kn[kind], M, us, fl,
                 100.0f * fl / us);
        printf("%s\n", line);
        table.push_back(line);
      }
    }
    cudaFree(A4);
    cudaFree(A4s);
    cudaFree(norm_w);
  }
  printf("\n==== summary (%%floor = read-only floor time / kernel time) ====\n");
  for (auto& l : table) printf("%s\n", l.c_str());
}


// A W4A16 launch (bf16 a, one batch entry, bf16 out, weights with LINEAR scales
// when plain) for the timing modes; the caller sets b / b_sf.
static Launch w4a16_launch(const void* a, const float* g, void* out, bool packed) {
  Launch L;
  L.p.a = a;
  L.p.b_g = g;
  L.p.out = out;
  L.p.out_type = kOutBF16;
  L.p.b_sf_layout = 0;
  L.p.b_sf_cstride = 4;
  const int64_t d1[1] = {1};
  make_batch_map(d1, d1, 0, &L.p.map);
  L.batch = 1;
  L.packed = packed;
  return L;
}

// Milliseconds of one launch of L between two events (after what the stream holds).
static float launch_ms(Launch& L, int M, int N, int K, cudaEvent_t e0, cudaEvent_t e1) {
  CK(cudaEventRecord(e0));
  if (finish(L, M, N, K, 0).failure()) exit(1);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  return ms;
}

// ---- L2 prefetch experiment (decode: weights prefetched into L2 during the
// small kernels between GEMMs, when DRAM is idle) ----
// Block b prefetches the first `frac` of the byte range that the GEMM's CTA b
// reads first (its groups: contiguous codes, contiguous scales).
__global__ void l2_prefetch_ranges(const uint8_t* w, const uint8_t* s, int64_t groups, int ctas, int64_t gw,
                                   int64_t gs, float frac) {
  const int64_t g0 = blockIdx.x * groups / ctas, g1 = (blockIdx.x + 1) * groups / ctas;
  const int64_t piece = 8192;
  for (int part = 0; part < 2; ++part) {
    const uint8_t* base = (part == 0 ? w : s) + g0 * (part == 0 ? gw : gs);
    const int64_t len = static_cast<int64_t>((g1 - g0) * (part == 0 ? gw : gs) * frac) / 16 * 16;
    for (int64_t off = threadIdx.x * piece; off < len; off += blockDim.x * piece) {
      const uint32_t n = static_cast<uint32_t>((piece < len - off ? piece : len - off));
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + off), "r"(n) : "memory");
    }
  }
}
// Busy for about `cycles` without touching memory (the decode's small kernels).
__global__ void spin_kernel(int64_t cycles) {
  const int64_t t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// DRV_SHAPES / DRV_MS as bench; per shape: GEMM time (events around the GEMM
// alone) after a 10 us spin, with the weight's first frac prefetched before the spin.
static void prefetch_exp() {
  const std::vector<int> sv = env_ints("DRV_SHAPES", {4096, 4096, 6144, 4096, 28672, 4096, 4096, 14336});
  const std::vector<int> Ms = env_ints("DRV_MS", {1, 16});
  const std::vector<int> fr = env_ints("DRV_FRACS", {0, 25, 50, 100});
  const int spin_us = env_ints("DRV_SPIN_US", {10})[0];
  int clk_khz = 0;
  CK(cudaDeviceGetAttribute(&clk_khz, cudaDevAttrClockRate, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  printf("\n%-12s %4s %6s %9s\n", "shape", "M", "pf%", "gemm_us");
  for (size_t si = 0; si + 1 < sv.size(); si += 2) {
    const int N = sv[si], K = sv[si + 1], C = K / 16;
    const int T = (N + 15) / 16, Kp = (K + 63) / 64 * 64;
    const WeightCopies wc(T, Kp, 400ull << 20);
    const int copies = wc.count();
    const std::vector<uint8_t*>&W = wc.W, &S = wc.S;
    const BenchIo io(32, K, N);
    const int64_t groups = (T + 1) / 2;
    const int ctas = static_cast<int>(std::min<int64_t>(groups, jaxfp4::sm_count()));
    for (int M : Ms)
      for (int f : fr) {
        Launch L = w4a16_launch(io.A, io.g, io.out, true);
        double total = 0;
        const int iters = 3 * copies + 30;
        for (int i = 0; i < iters; ++i) {
          const int c = i % copies;
          if (f > 0)
            l2_prefetch_ranges<<<ctas, 32>>>(W[c], S[c], groups, ctas, 2LL * 8 * Kp, 2LL * Kp, f / 100.0f);
          spin_kernel<<<132, 32>>>(static_cast<int64_t>(spin_us) * clk_khz / 1000);
          L.p.b = W[c];
          L.p.b_sf = S[c];
          const float ms = launch_ms(L, M, N, K, e0, e1);
          if (i >= copies) total += ms;
        }
        printf("%5dx%-6d %4d %5d%% %9.2f\n", N, K, M, f, 1000 * total / (iters - copies));
      }
    (void)C;
  }
}

#ifdef JAXFP4_TRACE
// Timelines of isolated launches (built with -DJAXFP4_TRACE): per shape and M,
// the packed W4A16 kernel's per-CTA stamps (gemm_small_m_packed.cuh), in us from
// the first CTA's start, as min / median / max over the CTAs (medians over runs),
// beside the events' time of the launch and of the floor kernel alone.
static void trace_exp() {
  const std::vector<int> sv = env_ints("DRV_SHAPES", {4096, 4096, 6144, 4096, 28672, 4096, 4096, 14336});
  const std::vector<int> Ms = env_ints("DRV_MS", {1, 16});
  const int runs = 15;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  float* dsum;
  CK(cudaMalloc(&dsum, 4));
  const char* names[kTraceSlots] = {"start", "setup", "1st item", "last item", "w0 done", "end", "last copy",
                                    "wN done"};
  for (size_t si = 0; si + 1 < sv.size(); si += 2) {
    const int N = sv[si], K = sv[si + 1];
    const int T = (N + 15) / 16, Kp = (K + 63) / 64 * 64;
    const WeightCopies wc(T, Kp, 160ull << 20);
    const int copies = wc.count();
    const BenchIo io(32, K, N);
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    // the floor alone: one stream over data + scales of a copy
    std::vector<double> fl;
    for (int r = 0; r < runs; ++r) {
      const int c = r % copies;
      const int64_t n16 = static_cast<int64_t>(wc.wbytes + wc.sbytes) / 16;
      CK(cudaEventRecord(e0));
      stream_read_kernel<<<static_cast<unsigned>(std::min<int64_t>((n16 + 511) / 512, jaxfp4::sm_count() * 2)),
                           512>>>(wc.W[c], static_cast<int64_t>(wc.wbytes), dsum, 0);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      fl.push_back(ms * 1000);
    }
    uint16_t* norm_w = nullptr;  // DRV_PROLOGUE=1: the RMSNorm prologue (M <= 8), weight bf16 ones
    const bool rms = !env_ints("DRV_PROLOGUE", {0}).empty() && env_ints("DRV_PROLOGUE", {0})[0] == 1;
    if (rms) {
      CK(cudaMalloc(&norm_w, static_cast<size_t>(K) * 2));
      std::vector<uint16_t> ones(K, 0x3F80);
      CK(cudaMemcpy(norm_w, ones.data(), ones.size() * 2, cudaMemcpyHostToDevice));
    }
    for (int M : Ms) {
      Launch L = w4a16_launch(io.A, io.g, io.out, true);
      L.p.a_g = nullptr;  // W4A16
      if (rms) {
        L.p.prologue = kPrologueRmsNorm;
        L.p.norm_w = reinterpret_cast<const __nv_bfloat16*>(norm_w);
        L.p.eps = 1e-5f;
      }
      std::vector<double> ev;
      std::vector<std::vector<double>> lo(kTraceSlots), md(kTraceSlots), hi(kTraceSlots);
      int ctas = 0;
      for (int r = 0; r < runs + 2; ++r) {
        const int c = r % copies;
        L.p.b = wc.W[c];
        L.p.b_sf = wc.S[c];
        std::vector<unsigned long long> z(1024 * kTraceSlots, 0);
        CK(cudaMemcpyToSymbol(jaxfp4_trace, z.data(), z.size() * 8));
        CK(cudaDeviceSynchronize());
        const float ms = launch_ms(L, M, N, K, e0, e1);
        CK(cudaMemcpyFromSymbol(z.data(), jaxfp4_trace, z.size() * 8));
        if (r < 2) continue;  // warm-up
        ev.push_back(ms * 1000);
        unsigned long long t0 = ~0ull;
        ctas = 0;
        for (int b = 0; b < 1024; ++b)
          if (z[b * kTraceSlots] != 0) {
            t0 = std::min(t0, z[b * kTraceSlots]);
            ctas = b + 1;
          }
        for (int s = 0; s < kTraceSlots; ++s) {
          std::vector<double> v;
          for (int b = 0; b < ctas; ++b)
            if (z[b * kTraceSlots + s] != 0) v.push_back((z[b * kTraceSlots + s] - t0) / 1000.0);
          if (v.empty()) continue;
          std::sort(v.begin(), v.end());
          lo[s].push_back(v.front());
          md[s].push_back(v[v.size() / 2]);
          hi[s].push_back(v.back());
        }
      }
      printf("\ntrace %dx%d M=%d: %d CTAs, launch (events) %.2f us, floor alone %.2f us\n", N, K, M, ctas,
             median(ev), median(fl));
      const int order[kTraceSlots] = {0, 1, 2, 6, 3, 4, 7, 5};
      for (int s : order)
        if (!md[s].empty())
          printf("  %-10s min %7.2f  med %7.2f  max %7.2f\n", names[s], median(lo[s]), median(md[s]), median(hi[s]));
    }
  }
}
#endif

// One configuration, a few launches (for ncu): one N K M kind(0 packed, 1 plain)
static void one(int N, int K, int M, int kind) {
  const int C = K / 16, T = (N + 15) / 16, Kp = (K + 63) / 64 * 64;
  const size_t wbytes = kind == 0 ? static_cast<size_t>(T) * 8 * Kp : static_cast<size_t>(N) * K / 2;
  const size_t sbytes = kind == 0 ? static_cast<size_t>(T) * Kp : static_cast<size_t>(N) * C;
  uint8_t *W, *S;
  CK(cudaMalloc(&W, wbytes));
  CK(cudaMalloc(&S, sbytes));
  fill_kernel<<<1024, 256>>>(W, wbytes, 7, 0);
  fill_kernel<<<1024, 256>>>(S, sbytes, 8, 1);
  const BenchIo io(M, K, N);
  Launch L = w4a16_launch(io.A, io.g, io.out, kind == 0);
  L.p.b = W;
  L.p.b_sf = S;
  for (int i = 0; i < 5; ++i)
    if (finish(L, M, N, K, 0).failure()) exit(1);
  CK(cudaDeviceSynchronize());
  printf("one: done\n");
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "one") {
    one(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    return 0;
  }
  const std::string mode = argc > 1 ? argv[1] : "check";
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  int rc = 0;
  if (mode == "check" || mode == "all") rc |= check_all(quick);
  if (mode == "bench" || mode == "all") bench(quick);
  if (mode == "prefetch") prefetch_exp();
#ifdef JAXFP4_TRACE
  if (mode == "trace") trace_exp();
#endif
  return rc;
}
