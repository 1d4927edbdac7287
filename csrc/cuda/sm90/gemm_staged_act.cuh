// Activation rows staged in shared memory by the packed small-M GEMM's
// consumers before its main loop (gemm_small_m_packed.cuh), which then takes
// its B fragments from there instead of from global memory:
//   - in-kernel W4A4 quantization (QA; qa_quantize_rows in the packed kernel's
//     file): the rows quantized and decoded back to bf16;
//   - the fused prologues of jaxfp4_gemm_fused (this file): the rows of
//     RMSNorm(x) or SwiGLU(x), so that a decoder's norm or gated activation is
//     not a separate XLA kernel between two GEMMs (W4A4: then quantized in
//     place, as QA quantizes).
// Each CTA computes the same rows (M <= 8): a few KB of L2 reads that overlap
// the producer's first weight copies.
//
// Row r (r < min(M, 8)) of the buffer holds K (rounded up to whole 64-element
// chunks, zero-filled) bf16 values in order, plus 16 bytes so that row r's
// 16-byte loads fall in other banks than row r + 1's.
#pragma once

#include "gemm_small_m_common.cuh"

namespace jaxfp4 {
namespace sm90_gemm {

__host__ __device__ inline int64_t qa_row_bytes(int64_t K) { return (K + kChunk - 1) / kChunk * kChunk * 2 + 16; }
constexpr int64_t kQaMaxBytes = 80 * 1024;  // beside the M <= 8 ring and reduction buffers (227 KB)

// What the fused kernel stages (Params::prologue; jaxfp4/primitives/fused_gemm.py's PROLOGUE_IDS).
enum FusedPrologue : int32_t {
  kPrologueNone = 0,     // no prologue (the residual alone runs the ordinary kernels)
  kPrologueRmsNorm = 1,  // a [M, K]: bf16((x * rsqrt(mean(x^2) + eps)) * w), float32 inside
  kPrologueSwiGlu = 2,   // a [M, 2K] = [gate | up]: bf16(silu(gate) * up), float32 inside
};

// Barrier 1 over the consumer warps only (barrier 0, __syncthreads, would wait for the producer).
__device__ __forceinline__ void consumers_sync(int nc) {
  asm volatile("bar.sync 1, %0;" ::"r"(nc * 32) : "memory");
}

__device__ __forceinline__ uint4 pack8(const float (&y)[8]) {
  return make_uint4(pack_bf16x2(y[1], y[0]), pack_bf16x2(y[3], y[2]), pack_bf16x2(y[5], y[4]),
                    pack_bf16x2(y[7], y[6]));
}

// A thread's items in the staged rows: (row r, 16-byte vector v) for the flat
// index b = r * vp + v in tid, tid + nthreads, ..., walked kStageUnroll at a time
// with all of a round's loads issued before any compute: they are L2 hits of
// ~1 us latency, and one round trip instead of several is most of a prologue's
// cost. (r, v) advance by nthreads without a division.
constexpr int kStageUnroll = 4;
struct StageIter {
  int r, v, vp, rows, step_r, step_v;
  __device__ __forceinline__ StageIter(int b, int vp_, int rows_, int nthreads) : vp(vp_), rows(rows_) {
    r = b / vp;
    v = b - r * vp;
    step_r = nthreads / vp;
    step_v = nthreads - step_r * vp;
  }
  __device__ __forceinline__ bool valid() const { return r < rows; }
  __device__ __forceinline__ void next() {
    r += step_r;
    v += step_v;
    if (v >= vp) {
      v -= vp;
      ++r;
    }
  }
};

// Rounds of kStageUnroll items every thread walks alike (the rows' vectors, padding included).
__device__ __forceinline__ int stage_rounds(int rows, int vp, int nthreads) {
  return (rows * vp + kStageUnroll * nthreads - 1) / (kStageUnroll * nthreads);
}

// One round's items: rr[u] their row (-1: none), vv[u] their vector, in[u]
// load(r, v) for those inside K (else left as it was); all loads issued first.
template <typename In, typename Load>
__device__ __forceinline__ void load_round(StageIter& it, int v_in, Load load, In (&in)[kStageUnroll],
                                           int (&rr)[kStageUnroll], int (&vv)[kStageUnroll]) {
#pragma unroll
  for (int u = 0; u < kStageUnroll; ++u, it.next()) {
    rr[u] = it.valid() ? it.r : -1;
    vv[u] = it.v;
    if (rr[u] >= 0 && vv[u] < v_in) in[u] = load(rr[u], vv[u]);
  }
}

// The rows' vectors into `act`: compute(r, load(r, v)) for v < K / 8, zero from
// there to the chunk padding. The rounds are counted alike in every thread and
// compute runs in every lane (on zeros for a lane without an item), so it may
// use warp shuffles.
// A no-op `issued` callback (stage_rows, rms_norm_rows).
struct NoSignal {
  __device__ __forceinline__ void operator()() const {}
};

template <typename In, typename Load, typename Compute, typename Issued = NoSignal>
__device__ __forceinline__ void stage_rows(int rows, int K, unsigned char* act, int tid, int nthreads, Load load,
                                           Compute compute, Issued issued = {}) {
  const int v_in = K / 8, vp = (K + kChunk - 1) / kChunk * (kChunk / 8);
  const int64_t stride = qa_row_bytes(K);
  const int rounds = stage_rounds(rows, vp, nthreads);
  StageIter it(tid, vp, rows, nthreads);
  for (int round = 0; round < rounds; ++round) {
    In in[kStageUnroll] = {};
    int rr[kStageUnroll], vv[kStageUnroll];
    load_round(it, v_in, load, in, rr, vv);
    if (round == 0) issued();
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const uint4 y = compute(max(rr[u], 0), in[u]);
      if (rr[u] >= 0)
        *reinterpret_cast<uint4*>(act + rr[u] * stride + 16 * vv[u]) = vv[u] < v_in ? y : make_uint4(0, 0, 0, 0);
    }
  }
}

struct TwoVecs {
  uint4 x, y;
};

__device__ __forceinline__ float sum_squares8(const uint4& v) {
  float x[8], t = 0.0f;
  unpack8<__nv_bfloat16>(v, x);
#pragma unroll
  for (int i = 0; i < 8; ++i) t = fmaf(x[i], x[i], t);
  return t;
}

// RMSNorm of rows 0 .. min(M, 8) - 1 of a [M, K] into `act`. The sum of squares
// is float32: per thread over its vectors, then over the warp (a butterfly),
// then over the warps in warp order through `scratch` (min(M, 8) * nc floats);
// lane r of every warp adds row r's warp sums in the same order and hands the
// rstd out by shuffle, so all threads use one rstd per row. Where a thread's
// vectors take one round (K = 4096: up to 4 rows) they stay in registers from
// the sums to the output; else the second pass loads them again (L1 hits).
// Ends with a consumer barrier (act is ready).
template <typename Issued = NoSignal>
__device__ __forceinline__ void rms_norm_rows(const Params& p, unsigned char* act, float* scratch, int tid, int nc,
                                              Issued issued = {}) {
  const int rows = min(p.M, 8), K = p.K, v_in = K / 8, nthreads = nc * 32;
  const int vp = (K + kChunk - 1) / kChunk * (kChunk / 8);
  const int warp = tid >> 5, lane = tid & 31;
  const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(p.a);
  const __nv_bfloat16* norm_w = p.norm_w;
  auto load = [a, K, norm_w](int r, int v) {
    return TwoVecs{ld_act16(a + static_cast<int64_t>(r) * K + 8 * v), ld_act16(norm_w + 8 * v)};
  };
  // Pass 1: the sums of squares (the first round's loads kept).
  TwoVecs first[kStageUnroll];
  int rr[kStageUnroll], vv[kStageUnroll];
  float s[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) s[r] = 0.0f;
  StageIter it(tid, vp, rows, nthreads);
  const int rounds = stage_rounds(rows, vp, nthreads);
  for (int round = 0; round < rounds; ++round) {
    TwoVecs in[kStageUnroll] = {};
    load_round(it, v_in, load, in, rr, vv);
    if (round == 0) issued();
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      if (rr[u] >= 0 && vv[u] < v_in) {
        const float t = sum_squares8(in[u].x);
#pragma unroll
        for (int q = 0; q < 8; ++q)  // (ptxas keeps s[] in local memory, indexed by rr[u]: prologue only)
          if (q == rr[u]) s[q] += t;
      }
      if (round == 0) first[u] = in[u];
    }
  }
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    if (r < rows) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s[r] += __shfl_xor_sync(0xFFFFFFFFu, s[r], o);
      if (lane == 0) scratch[r * nc + warp] = s[r];
    }
  }
  consumers_sync(nc);
  float my_rstd = 0.0f;  // lane r: row r's
  if (lane < rows) {
    float t = 0.0f;
    for (int w = 0; w < nc; ++w) t += scratch[lane * nc + w];
    my_rstd = rsqrtf(t / static_cast<float>(K) + p.eps);
  }
  const int64_t stride = qa_row_bytes(K);
  auto compute = [my_rstd](int r, const TwoVecs& in) {
    const float rstd = __shfl_sync(0xFFFFFFFFu, my_rstd, r);
    float x[8], w[8], y[8];
    unpack8<__nv_bfloat16>(in.x, x);
    unpack8<__nv_bfloat16>(in.y, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = x[i] * rstd * w[i];
    return pack8(y);
  };
  if (rounds == 1) {
    // rr / vv still describe round 0 (the only one). The shuffles need every lane.
#pragma unroll
    for (int u = 0; u < kStageUnroll; ++u) {
      const uint4 y = compute(max(rr[u], 0), first[u]);
      if (rr[u] >= 0)
        *reinterpret_cast<uint4*>(act + rr[u] * stride + 16 * vv[u]) = vv[u] < v_in ? y : make_uint4(0, 0, 0, 0);
    }
  } else {
    stage_rows<TwoVecs>(rows, K, act, tid, nthreads, load, compute);
  }
  consumers_sync(nc);
}

// SwiGLU of rows 0 .. min(M, 8) - 1 of a [M, 2K] (gate | up) into `act`:
// gate * sigmoid(gate) * up in float32 (the fast exp and division: a few ulp,
// far below the bf16 rounding), rounded once. Ends with a consumer barrier.
template <typename Issued = NoSignal>
__device__ __forceinline__ void swiglu_rows(const Params& p, unsigned char* act, int tid, int nc, Issued issued = {}) {
  const int rows = min(p.M, 8), K = p.K;
  const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(p.a);
  stage_rows<TwoVecs>(
      rows, K, act, tid, nc * 32,
      [a, K](int r, int v) {
        const __nv_bfloat16* row = a + static_cast<int64_t>(r) * 2 * K + 8 * v;
        return TwoVecs{ld_act16(row), ld_act16(row + K)};
      },
      [](int, const TwoVecs& in) {
        float gate[8], up[8], y[8];
        unpack8<__nv_bfloat16>(in.x, gate);
        unpack8<__nv_bfloat16>(in.y, up);
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = __fdividef(gate[i], 1.0f + __expf(-gate[i])) * up[i];
        return pack8(y);
      },
      issued);
  consumers_sync(nc);
}

}  // namespace sm90_gemm
}  // namespace jaxfp4
