// Small-M NVFP4 GEMM for Hopper (sm_90a; also builds for sm_100a): the kernels
// and launches behind `jaxfp4_gemm_*` (handlers: gemm_small_m_ffi.cu),
// out[m, n] = g * sum_k a[m, k] * (e2m1(q[n, k]) * SF[n, k/16])  (spec section 4).
//
// Decode (M = 1..32 tokens) is bound by reading the weights, 0.5625 byte per
// element. The kernel streams them once, dequantizes in registers and feeds
// mma.sync m16n8k16 (bf16 or f16 operands, float32 accumulation) with the
// WEIGHTS as the 16-row A operand and the TOKENS on the 8-wide side
// (out^T = W A^T): one n8 tile for M <= 8, two for M <= 16, four for M <= 32;
// larger M loops over 32-token tiles (grid.y). Every dequantized weight
// fragment is used by all the token tiles of the launch.
//
// Work decomposition. A "group" is kTPW = 2 row tiles (32 weight rows). The
// grid is persistent (about one CTA per SM, grid.y over 32-token tiles,
// grid.z over the output batch): each CTA walks a balanced contiguous range of
// groups (packed: of tiles, in groups, the last one possibly a single tile),
// and its warps split K: warp w owns the same chunks of 64 elements
// in every group (plain: a contiguous slice; packed: kCpi chunks of every
// ring item, gemm_small_m_packed.cuh). Per chunk and tile, lane (g = lane/4, t = lane%4) holds rows
// g and g+8, elements 16t .. 16t+15 of the chunk: exactly one scale block per
// row, 32 codes = 16 bytes. mma step s (0..3) of the chunk uses the lane's
// elements 4s .. 4s+3 (a permutation of K inside the chunk, applied to both
// operands alike). At the end of a group the warps' float32 partial sums are
// added in warp order through shared memory (deterministic; no global
// workspace, no atomics) and stored.
// Loads in flight: packed weights go through a CTA-wide ring of shared-memory
// stages filled by a producer warp's bulk copies (the kernel in
// gemm_small_m_packed.cuh, where the warps split K item by item); plain
// weights through a register ring of kDepth chunks per warp; activations (L2
// hits, the same chunks for every group) are loaded right before use (packed)
// or through a small register ring (plain).
//
// Dequantization is exact: E2M1 x E4M3 fits bf16 and fp16.
//   bf16: the nibble's bits s|e1e0m placed at bf16 bits 15|8..6 are the value
//         times 2^-126 (the subnormal code 0.5 included); times
//         S = SF * 2^119 (float32 -> bf16, exact, NaN kept) gives
//         e2m1 * SF * 2^-7.
//   fp16: bits 15|11..9 are the value times 2^-14; S = SF * 2^7 (exact in
//         fp16, <= 57344) gives e2m1 * SF * 2^-7 again.
// The epilogue multiplies by 2^7 * g_b (W4A4: 2^14 * g_a * g_b, as the
// activations are dequantized the same way) and rounds once to the output type.
//
// Weight orders (attribute b_packing):
//   0  plain checkpoint order: data [*Lb, N, K/2] (element 2j in the low
//      nibble), scales [*Lb, ...] in b_sf_layout. Each lane loads 8 bytes per
//      row per chunk; an mma register holds elements (j, j+4) of a 32-bit word
//      (4 shifts/masks per register), the activations are permuted to match.
//   1  jaxfp4.packing's sm90 order (see jaxfp4/packing.py): data
//      [*Lb, ceil(N/16), 8*Kp], scales [*Lb, ceil(N/16), Kp] with
//      Kp = ceil(K/64)*64; one 16-byte load per lane per tile and chunk holds
//      exactly its A fragments for 4 mma steps, with sign and magnitude bits
//      placed so that a bf16x2 register costs 2.75 integer ops on average, and
//      the activations need no permutation. Rows and K are zero-padded, so
//      the hot loop has no guards.
//
// W4A4: the activation codes are dequantized per lane in registers the same
// way (their scales read through sf_offset, any of the three layouts).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "jaxfp4/batch.h"
#include "jaxfp4/format.h"
#include "jaxfp4/registry.h"
#include "../device.cuh"
#include "gemm_small_m.h"
#include "gemm_small_m_common.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxfp4 {
namespace sm90_gemm {

// ---- the plain-weight kernel ---------------------------------------------------------

// Plain weights (the packed order runs gemm_small_m_packed.cuh). Tuning knobs,
// overridable for experiments: weight chunks in flight per warp (a register
// ring), activation chunks in flight (L2 hits), warps (K slices) per CTA.
#ifndef JAXFP4_GEMM_DEPTH
#define JAXFP4_GEMM_DEPTH 4
#endif
#ifndef JAXFP4_GEMM_WARPS_N8
#define JAXFP4_GEMM_WARPS_N8 16
#endif
template <int NT>
struct Cfg {
  static constexpr int kDepth = JAXFP4_GEMM_DEPTH;
  static constexpr int kActDepth = NT == 4 ? 1 : 2;
  static constexpr int kMaxWarps = NT == 1 ? JAXFP4_GEMM_WARPS_N8 : (NT == 2 ? 12 : 8);
};

template <typename T, int NT, bool A4>
__global__ void __launch_bounds__(Cfg<NT>::kMaxWarps * 32, 1)
    gemm_small_m_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg<NT>::kDepth;
  constexpr int DA = Cfg<NT>::kActDepth;
  static_assert(D % DA == 0, "the activation ring must divide the weight ring");
  using St = Stage;
  using At = ActStage<NT, A4>;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nwarps = blockDim.x >> 5;
  const Prologue<NT, A4> pro(p, warp, g, t);
  const int64_t z = pro.z, ib = pro.ib;
  const int m0 = pro.m0, g_begin = pro.g_begin, ngroups = pro.ngroups, c0 = pro.c0;
  const auto& ap = pro.ap;
  const auto& asp = pro.asp;
  // Per group, warp w owns chunks c0 .. c0 + cpw - 1; a group is spg slots
  // (cpw rounded up to D) so that groups start at a multiple of D slots.
  const int cpw = p.chunks_per_warp;
  const int spg = (cpw + D - 1) / D * D;

  // ---- weight pointers at chunk c0 of the group being issued ---------------------------
  const uint8_t* const b_base = p.b + ib * p.b_stride;
  const uint8_t* const bsf_base = p.b_sf + ib * p.b_sf_stride;
  // Rows past N (and the second tile of an odd last group) read a clamped valid
  // row instead: their outputs are never stored, and loads stay unpredicated.
  const uint8_t* wp[kTPW][2];
  const uint8_t* sp[kTPW][2];
  auto set_group = [&](int grp) {
#pragma unroll
    for (int tp = 0; tp < kTPW; ++tp) {
      const int tile = min(grp * kTPW + tp, p.tiles - 1);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t n = min(tile * 16 + g + 8 * r, p.N - 1);
        wp[tp][r] = b_base + n * (p.K / 2) + static_cast<int64_t>(c0) * 32 + t * 8;
        sp[tp][r] = bsf_base + sf_offset(static_cast<SfLayout>(p.b_sf_layout), n, t, p.C) +
                    static_cast<int64_t>(c0) * p.b_sf_cstride;
      }
    }
  };

  // Issues the weight loads of chunk c0 + i (slot i of the current group) into st.
  // TAIL: the last chunk of a K that is not a multiple of 64; lanes whose block
  // is past K load zeros (plain order; the packed order is zero-padded).
  auto issue = [&](St& st, int i, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    [[maybe_unused]] const bool blk_ok = !kTail || 4 * (c0 + i) + t < p.C;
#pragma unroll
    for (int tp = 0; tp < kTPW; ++tp) {
      uint2 w0, w1;
      uint32_t s0, s1;
      const int64_t wo = static_cast<int64_t>(i) * 32, so = static_cast<int64_t>(i) * p.b_sf_cstride;
      if constexpr (kTail) {
        w0 = ld_stream8_pred(wp[tp][0] + wo, blk_ok);
        w1 = ld_stream8_pred(wp[tp][1] + wo, blk_ok);
        s0 = ld_u8_pred(sp[tp][0] + so, blk_ok);
        s1 = ld_u8_pred(sp[tp][1] + so, blk_ok);
      } else {
        w0 = ld_stream8(wp[tp][0] + wo);
        w1 = ld_stream8(wp[tp][1] + wo);
        s0 = ld_u8(sp[tp][0] + so);
        s1 = ld_u8(sp[tp][1] + so);
      }
      st.w[tp] = make_uint4(w0.x, w0.y, w1.x, w1.y);
      st.sf[tp] = s0 | (s1 << 8);
    }
  };
  // Issues the activation loads of slot i (chunk c0 + i; the same for every group).
  auto issue_act = [&](At& at, int i, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    load_act<NT, A4>(at, ap, asp, i, p.a_sf_cstride, !kTail || 4 * (c0 + i) + t < p.C);
  };
  const int tail_chunk = (p.K % kChunk) ? p.chunks - 1 : -1;  // chunk that needs the TAIL loads
  using Tail = std::true_type;
  using NoTail = std::false_type;
  auto issue_w = [&](St& st, int i) {
    if (c0 + i == tail_chunk) {
      issue(st, i, Tail{});
    } else {
      issue(st, i, NoTail{});
    }
  };
  auto issue_a = [&](At& at, int i) {
    if (c0 + i == tail_chunk) {
      issue_act(at, i, Tail{});
    } else {
      issue_act(at, i, NoTail{});
    }
  };

  float acc[kTPW][NT][4];
  zero_acc(acc);

  auto compute = [&](const St& st, const At& at) { mma_chunk<T, NT, false, A4>(acc, st, at); };

  // ---- epilogue of one group: reduce the warps' K slices (fixed order), scale, store ----
  const float alpha = epilogue_alpha<A4>(p, pro.ia, ib);
  const int64_t out_base = z * static_cast<int64_t>(p.M) * p.N;
  constexpr int F = kTPW * NT * 4 * 32;  // floats of one warp's partial sums
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* const red = reinterpret_cast<float*>(smem_raw);  // [nwarps][F] (when nwarps > 1)

  auto store = [&](int tile0, int tp, int nt, int j, int ln, float v) {
    store_frag(p, out_base, alpha, tile0, m0, tp, nt, j, ln, v);
  };

  auto finish_group = [&](int jg) {  // jg: the group's index relative to g_begin
    const int tile0 = (g_begin + jg) * kTPW;
    if (nwarps == 1) {
#pragma unroll
      for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) store(tile0, tp, nt, j, lane, acc[tp][nt][j]);
    } else {
      stash_acc(red + warp * F, acc, lane);
      __syncthreads();
      for (int idx = threadIdx.x; idx < F; idx += blockDim.x) {
        float v = red[idx];
        for (int w = 1; w < nwarps; ++w) v += red[w * F + idx];  // fixed order: deterministic
        const int ln = idx & 31, j = (idx >> 5) & 3, nt = (idx >> 7) % NT, tp = (idx >> 7) / NT;
        store(tile0, tp, nt, j, ln, v);
      }
      __syncthreads();
    }
    zero_acc(acc);
  };

  if (ngroups <= 0) return;  // uniform over the CTA
  auto slot_ok = [&](int s) { return s < cpw && c0 + s < p.chunks; };

  // ---- plain weights: register rings, weights one block of D slots ahead ----
  St st[D];
  At at[DA];
  int ig = 0, is = 0;  // weight issue cursor: group (relative) and slot
  set_group(g_begin);
#pragma unroll
  for (int i = 0; i < D; ++i)
    if (slot_ok(i)) issue_w(st[i], i);
#pragma unroll
  for (int i = 0; i < DA; ++i)
    if (slot_ok(i)) issue_a(at[i], i);
  is = D;
  int cg = 0, cs = 0;  // compute cursor
  const int blocks = ngroups * (spg / D);
  for (int blk = 0; blk < blocks; ++blk) {
    if (is == spg) {
      is = 0;
      if (++ig < ngroups) set_group(g_begin + ig);
    }
    const bool issuing = ig < ngroups;
    const bool more = blk + 1 < blocks;  // a later block exists (activation look-ahead may wrap)
#pragma unroll
    for (int i = 0; i < D; ++i) {
      if (slot_ok(cs + i)) compute(st[i], at[i % DA]);
      if (issuing && slot_ok(is + i)) issue_w(st[i], is + i);
      int sa = cs + i + DA;  // the slot DA ahead (wraps to the next group's same slots)
      const bool wrap = sa >= spg;
      if (wrap) sa -= spg;
      if ((!wrap || more) && slot_ok(sa)) issue_a(at[i % DA], sa);
    }
    is += D;
    cs += D;
    if (cs == spg) {
      cs = 0;
      finish_group(cg);
      ++cg;
    }
  }
}

}  // namespace sm90_gemm
}  // namespace jaxfp4

#include "gemm_small_m_packed.cuh"

namespace jaxfp4 {
namespace sm90_gemm {

// ---- host side ------------------------------------------------------------------------


template <typename T, int NT, bool PACKED, bool A4>
const char* kernel_name() {
  // Static strings for record_kernel.
  if constexpr (A4) {
    if constexpr (NT == 1) return PACKED ? "sm90_gemm_small_m_w4a4_n8_packed" : "sm90_gemm_small_m_w4a4_n8";
    if constexpr (NT == 2) return PACKED ? "sm90_gemm_small_m_w4a4_n16_packed" : "sm90_gemm_small_m_w4a4_n16";
    return PACKED ? "sm90_gemm_small_m_w4a4_n32_packed" : "sm90_gemm_small_m_w4a4_n32";
  } else if constexpr (std::is_same<T, __half>::value) {
    if constexpr (NT == 1) return PACKED ? "sm90_gemm_small_m_w4a16_f16_n8_packed" : "sm90_gemm_small_m_w4a16_f16_n8";
    if constexpr (NT == 2)
      return PACKED ? "sm90_gemm_small_m_w4a16_f16_n16_packed" : "sm90_gemm_small_m_w4a16_f16_n16";
    return PACKED ? "sm90_gemm_small_m_w4a16_f16_n32_packed" : "sm90_gemm_small_m_w4a16_f16_n32";
  } else {
    if constexpr (NT == 1)
      return PACKED ? "sm90_gemm_small_m_w4a16_bf16_n8_packed" : "sm90_gemm_small_m_w4a16_bf16_n8";
    if constexpr (NT == 2)
      return PACKED ? "sm90_gemm_small_m_w4a16_bf16_n16_packed" : "sm90_gemm_small_m_w4a16_bf16_n16";
    return PACKED ? "sm90_gemm_small_m_w4a16_bf16_n32_packed" : "sm90_gemm_small_m_w4a16_bf16_n32";
  }
}

// Allows a kernel the dynamic shared memory it can ask for (above the 48 KB
// default), once per device.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes, std::atomic<bool>* done) {
  const int dev = device_slot(current_device());
  if (!done[dev].load(std::memory_order_relaxed)) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
        cudaSuccess)
      return cudaGetLastError();
    done[dev].store(true, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// Consumer warps for a group of `runs` kCpi-chunk runs (a warp takes one run
// per ring item): the fewest items per group (a group takes `items` item times
// whatever the warp count), then, among the counts that reach it, the fewest
// warps (the last item leaves the fewest idle). Fullest items alone is wrong:
// 86 runs (K = 11008) fill 2 warps exactly, and 2 warps take 43 items.
inline int64_t packed_consumers(int64_t runs, int64_t max_warps) {
  const int64_t w_max = std::max<int64_t>(1, std::min(max_warps, runs));
  const int64_t items = (runs + w_max - 1) / w_max;
  return (runs + items - 1) / items;  // the fewest warps with that many items
}

// Packed weights: `nc` consumer warps split K item by item (plus the producer
// warp); a persistent grid of about one wave walks the tile groups.
template <typename T, int NT, bool A4, int ACT = kActGlobal, bool PAIRED_OUT = false>
cudaError_t launch_packed(Launch L, cudaStream_t stream, const char** name) {
  constexpr bool kStaged = ACT != kActGlobal;
  Params& p = L.p;
  constexpr int kCpi = PkCfg<NT>::kCpi;
  const int64_t groups = (static_cast<int64_t>(p.tiles) + kTPW - 1) / kTPW;
  const int64_t mtiles = (static_cast<int64_t>(p.M) + 8 * NT - 1) / (8 * NT);
  if (groups > 0x7FFFFFFF || mtiles > 65535 || L.batch > 65535) return cudaErrorInvalidConfiguration;
  const int64_t runs = (std::max<int32_t>(p.chunks, 1) + kCpi - 1) / kCpi;  // kCpi-chunk runs per group
  const int64_t nc = packed_consumers(runs, PkCfg<NT>::kWarps);
  p.chunks_per_warp = kCpi;
  p.items = static_cast<int32_t>((runs + nc - 1) / nc);
  const int threads = static_cast<int>(nc + 1) * 32;
  // Staged activation rows after the ring (checked by the handlers: <= kQaMaxBytes).
  const size_t qa_bytes = kStaged ? static_cast<size_t>(std::min<int64_t>(p.M, 8) * qa_row_bytes(p.K)) : 0;
  const size_t smem = packed_smem_bytes<NT>(static_cast<int>(nc)) + qa_bytes;
  auto kernel = gemm_packed_kernel<T, NT, A4, ACT, PAIRED_OUT>;
  static std::atomic<bool> smem_set[kMaxDevices];
  if (cudaError_t e =
          allow_smem(kernel, packed_smem_bytes<NT>(PkCfg<NT>::kWarps) + (kStaged ? kQaMaxBytes : 0), smem_set);
      e != cudaSuccess)
    return e;
  // Cached by warp count (consumers + producer), so computed with the shared memory
  // the most staged rows take: the same answer whatever launch comes first.
  static std::atomic<int> occupancy[PkCfg<NT>::kWarps + 2][kMaxDevices];
  const size_t occ_smem = packed_smem_bytes<NT>(static_cast<int>(nc)) + (kStaged ? kQaMaxBytes : 0);
  const int dev = current_device();
  const int64_t slots = static_cast<int64_t>(sm_count(dev)) *
                        std::max(1, resident_ctas(reinterpret_cast<const void*>(kernel), threads, occ_smem,
                                                  occupancy[threads / 32], dev));
  // CTAs share out single tiles (the kernel walks its share in groups).
  const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(p.tiles, slots / (mtiles * L.batch)));
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(mtiles), static_cast<unsigned>(L.batch));
  // Programmatic dependent launch: the kernel's launch and set-up overlap the
  // previous kernel's tail (gemm_small_m_packed.cuh).
  if (cudaError_t e = launch_dependent_if(L.programmatic, kernel, grid, dim3(threads), smem, stream, p);
      e != cudaSuccess)
    return e;
  if constexpr (PAIRED_OUT) {
    const bool rot = p.epilogue == kEpilogueRotaryKV;
    *name = ACT == kActQuantize ? (rot ? "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_rotary_kv_out"
                                       : "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_swiglu_out")
            : ACT == kActFused
                ? (p.a_g != nullptr ? (rot ? "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_staged_rotary_kv_out"
                                           : "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_staged_swiglu_out")
                                    : (rot ? "sm90_gemm_small_m_w4a16_bf16_n8_packed_staged_rotary_kv_out"
                                           : "sm90_gemm_small_m_w4a16_bf16_n8_packed_staged_swiglu_out"))
            : NT == 1 ? (rot ? "sm90_gemm_small_m_w4a16_bf16_n8_packed_rotary_kv_out"
                             : "sm90_gemm_small_m_w4a16_bf16_n8_packed_swiglu_out")
            : NT == 2 ? (rot ? "sm90_gemm_small_m_w4a16_bf16_n16_packed_rotary_kv_out"
                             : "sm90_gemm_small_m_w4a16_bf16_n16_packed_swiglu_out")
                      : (rot ? "sm90_gemm_small_m_w4a16_bf16_n32_packed_rotary_kv_out"
                             : "sm90_gemm_small_m_w4a16_bf16_n32_packed_swiglu_out");
  } else if constexpr (ACT == kActQuantize) {
    *name = "sm90_gemm_small_m_w4a4_n8_packed_quantize_a";
  } else if constexpr (ACT == kActFused) {
    const bool rms = p.prologue == kPrologueRmsNorm;
    if (p.a_g != nullptr) {
      *name = rms ? "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_rms_norm"
                  : "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_swiglu";
    } else {
      *name = rms ? "sm90_gemm_small_m_w4a16_bf16_n8_packed_rms_norm" : "sm90_gemm_small_m_w4a16_bf16_n8_packed_swiglu";
    }
  } else {
    *name = kernel_name<T, NT, true, A4>();
  }
  return cudaGetLastError();
}

// Plain weights: same decomposition, register rings instead of the cp.async one.
template <typename T, int NT, bool PACKED, bool A4>
cudaError_t launch_t(Launch L, cudaStream_t stream, const char** name) {
  if constexpr (PACKED) {
    return launch_packed<T, NT, A4>(L, stream, name);
  } else {
    Params& p = L.p;
    const int64_t groups = (static_cast<int64_t>(p.tiles) + kTPW - 1) / kTPW;
    const int64_t mtiles = (static_cast<int64_t>(p.M) + 8 * NT - 1) / (8 * NT);
    if (groups > 0x7FFFFFFF || mtiles > 65535 || L.batch > 65535) return cudaErrorInvalidConfiguration;
    const int64_t chunks = std::max<int32_t>(p.chunks, 1);
    int64_t nwk = std::min<int64_t>(Cfg<NT>::kMaxWarps, chunks);
    const int64_t cpw = (chunks + nwk - 1) / nwk;
    nwk = (chunks + cpw - 1) / cpw;
    p.chunks_per_warp = static_cast<int32_t>(cpw);
    const int threads = static_cast<int>(nwk) * 32;
    auto smem_bytes = [](int64_t warps) {
      return warps > 1 ? static_cast<size_t>(warps) * kTPW * NT * 4 * 32 * sizeof(float) : 0;
    };
    const size_t smem = smem_bytes(nwk);
    auto kernel = gemm_small_m_kernel<T, NT, A4>;
    static std::atomic<bool> smem_set[kMaxDevices];
    if (cudaError_t e = allow_smem(kernel, smem_bytes(Cfg<NT>::kMaxWarps), smem_set); e != cudaSuccess)
      return e;
    static std::atomic<int> occupancy[Cfg<NT>::kMaxWarps + 1][kMaxDevices];  // by warp count
    const int dev = current_device();
    const int64_t slots = static_cast<int64_t>(sm_count(dev)) *
                          std::max(1, resident_ctas(reinterpret_cast<const void*>(kernel), threads, smem,
                                                    occupancy[threads / 32], dev));
    const int64_t gx = std::max<int64_t>(1, std::min<int64_t>(groups, slots / (mtiles * L.batch)));
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(mtiles), static_cast<unsigned>(L.batch));
    kernel<<<grid, threads, smem, stream>>>(p);
    *name = kernel_name<T, NT, false, A4>();
    return cudaGetLastError();
  }
}

template <typename T, bool PACKED, bool A4>
cudaError_t launch_nt(const Launch& L, cudaStream_t stream, const char** name) {
  if (L.p.M <= 8) return launch_t<T, 1, PACKED, A4>(L, stream, name);
  if (L.p.M <= 16) return launch_t<T, 2, PACKED, A4>(L, stream, name);
  return launch_t<T, 4, PACKED, A4>(L, stream, name);
}

// The paired epilogues' kernels (SwiGLU, rotary; bf16 W4A16 packed; the fused op's
// handlers check what reaches here): the same choice as below, each with the
// epilogue's store.
cudaError_t launch_paired_out(const Launch& L, cudaStream_t stream, const char** name) {
  using B = __nv_bfloat16;
  if (L.qa) return launch_packed<B, 1, false, kActQuantize, true>(L, stream, name);
  if (L.p.prologue != kPrologueNone) return launch_packed<B, 1, false, kActFused, true>(L, stream, name);
  if (L.p.M <= 8) return launch_packed<B, 1, false, kActGlobal, true>(L, stream, name);
  if (L.p.M <= 16) return launch_packed<B, 2, false, kActGlobal, true>(L, stream, name);
  return launch_packed<B, 4, false, kActGlobal, true>(L, stream, name);
}

// Launches the GEMM described by L (already validated); *name gets the kernel's name.
cudaError_t launch(const Launch& L, cudaStream_t stream, const char** name) {
  if (L.p.epilogue != kEpilogueNone) return launch_paired_out(L, stream, name);
  if (L.qa) return launch_packed<__nv_bfloat16, 1, false, kActQuantize>(L, stream, name);
  // A fused prologue (W4A16, or W4A4 where p.a_g is set): packed, bf16, M <= 8.
  if (L.p.prologue != kPrologueNone) return launch_packed<__nv_bfloat16, 1, false, kActFused>(L, stream, name);
  if (L.a4) {
    return L.packed ? launch_nt<__nv_bfloat16, true, true>(L, stream, name)
                    : launch_nt<__nv_bfloat16, false, true>(L, stream, name);
  }
  if (L.f16) {
    return L.packed ? launch_nt<__half, true, false>(L, stream, name)
                    : launch_nt<__half, false, false>(L, stream, name);
  }
  return L.packed ? launch_nt<__nv_bfloat16, true, false>(L, stream, name)
                  : launch_nt<__nv_bfloat16, false, false>(L, stream, name);
}

ffi::Error finish(Launch& L, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M > 0x7FFFFFFF || N > 0x7FFFFFF0 || K > 0x7FFFFFF0) return bad("dimensions too large");
  L.p.M = static_cast<int32_t>(M);
  L.p.N = static_cast<int32_t>(N);
  L.p.K = static_cast<int32_t>(K);
  L.p.C = static_cast<int32_t>(K / 16);
  L.p.tiles = static_cast<int32_t>((N + 15) / 16);
  L.p.chunks = static_cast<int32_t>((K + kChunk - 1) / kChunk);
  if (M == 0 || N == 0 || L.batch == 0) return ffi::Error::Success();
  const char* name = nullptr;
  const cudaError_t err = launch(L, stream, &name);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("jaxfp4 gemm launch: ") + cudaGetErrorString(err));
  record_kernel("gemm", name);
  return ffi::Error::Success();
}

}  // namespace sm90_gemm
}  // namespace jaxfp4
