// Small-M NVFP4 GEMM for Hopper (sm_90a; also builds for sm_100a): the FFI
// handlers of `jaxfp4_gemm_w4a16` and `jaxfp4_gemm_w4a4` (csrc/README.md),
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
#include "jaxfp4/ffi_checks.h"
#include "quantize_decoded.h"
#include "jaxfp4/format.h"
#include "jaxfp4/registry.h"
#include "../device.cuh"
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

// Everything a launch needs besides the kernel choice.
struct Launch {
  Params p;
  int64_t batch = 1;  // output batch entries
  bool f16 = false;   // fp16 activations (W4A16)
  bool a4 = false;
  bool packed = false;
  bool qa = false;    // W4A4 with bf16 activations quantized in the kernel (packed, M <= 8)
  // A programmatic dependent launch (device.cuh). Off for a chain's first link:
  // its dependents copy weights early, which must not overlap whatever ran
  // before the call (jaxfp4_gemm_chain).
  bool programmatic = true;
};

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
template <typename T, int NT, bool A4, int ACT = kActGlobal>
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
  auto kernel = gemm_packed_kernel<T, NT, A4, ACT>;
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
  if constexpr (ACT == kActQuantize) {
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

// Launches the GEMM described by L (already validated); *name gets the kernel's name.
cudaError_t launch(const Launch& L, cudaStream_t stream, const char** name) {
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

// ---- FFI handlers -------------------------------------------------------------------

using Dims = ffi::Span<const int64_t>;

ffi::Error bad(const std::string& what) { return ffi::Error::InvalidArgument("jaxfp4 gemm (cuda): " + what); }

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
// K), N taken from out; fills L's weight, out and batch-map fields.
ffi::Error check_b_and_out(Dims ad, int nl, int64_t M, int64_t K, const ffi::AnyBuffer& b_data,
                           const ffi::AnyBuffer& b_scales, const ffi::AnyBuffer& b_g, int32_t b_sf_layout,
                           int32_t b_packing, const ffi::AnyBuffer& out, Launch* L, int64_t* N) {
  const Dims od = out.dimensions();
  if (static_cast<int>(od.size()) != nl + 2) return bad("out must have the rank of a");
  *N = od[nl + 1];
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

// Validates one fused GEMM and fills L (and M, N, K); launches nothing. The
// optional operands are null where unused (norm_w without prologue 1, a_g for
// W4A16, residual when there is none).
ffi::Error prepare_fused(const ffi::AnyBuffer& a, const ffi::AnyBuffer* norm_w, const ffi::AnyBuffer* a_g,
                         const ffi::AnyBuffer& b_data, const ffi::AnyBuffer& b_scales, const ffi::AnyBuffer& b_g,
                         const ffi::AnyBuffer* residual, const ffi::AnyBuffer& out, int32_t prologue, float eps,
                         int32_t b_sf_layout, int32_t b_packing, Launch* L, int64_t* M, int64_t* N, int64_t* K) {
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
  if (reinterpret_cast<uintptr_t>(a.untyped_data()) % 16 != 0) return bad("a is misaligned");
  const int64_t kd[2] = {*M, *K};
  if (auto e = check_b_and_out(Dims(kd, 2), 0, *M, *K, b_data, b_scales, b_g, b_sf_layout, b_packing, out, L, N);
      e.failure())
    return e;
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
// Unused operands (norm_w without prologue 1, a_g for W4A16, residual when
// none) are empty.
ffi::Error GemmFusedImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer norm_w, ffi::AnyBuffer a_g,
                         ffi::AnyBuffer b_data, ffi::AnyBuffer b_scales, ffi::AnyBuffer b_g, ffi::AnyBuffer residual,
                         ffi::Result<ffi::AnyBuffer> out, int32_t prologue, float eps, int32_t b_sf_layout,
                         int32_t b_packing) {
  Launch L;
  int64_t M = 0, N = 0, K = 0;
  if (auto e = prepare_fused(a, given(norm_w), given(a_g), b_data, b_scales, b_g, given(residual), *out, prologue,
                             eps, b_sf_layout, b_packing, &L, &M, &N, &K);
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
                             kPrologueNone, 0.0f, b_sf_layout, b_packing, &L, &M, &N, &K);
      e.failure())
    return e;
  if (auto e = run_quantize_decoded(stream, a, a_g, b_g, *decoded, *g_ab, /*programmatic=*/false); e.failure())
    return e;
  L.p.weights_ready = 1;
  return finish(L, M, N, K, stream);
}

// A chain of fused GEMMs (jaxfp4.matmul_chain) as one call: link i is
// jaxfp4_gemm_fused on a_i, with a_0 the call's first operand and a_i (i > 0)
// link i-1's result, and residual_i an operand, nothing, or an earlier link's
// result (res_from[i] = j >= 0). Operands: a_0, then per link norm_w, a_g,
// b_data, b_scales, b_g, residual (empty where unused, and where res_from names
// a result); results: each link's out. Every link is validated before any
// launches; each is bit for bit its own jaxfp4_gemm_fused call.
// Why one call: XLA records each custom call as a graph node of its own, and
// only launches made inside one call keep their programmatic dependent launch
// (benchmarks/kernel/NOTES.md, session 12). A later link's weights are this
// call's operands, which no kernel of the call writes, so its producer copies
// them before griddepcontrol.wait (weights_ready): its ring fills while the
// link before it finishes, hiding its start-up (session 14).
ffi::Error GemmChainImpl(cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets,
                         ffi::Span<const int32_t> prologue, ffi::Span<const float> eps,
                         ffi::Span<const int32_t> b_sf_layout, ffi::Span<const int32_t> b_packing,
                         ffi::Span<const int32_t> res_from) {
  constexpr size_t kPerLink = 6, kMaxLinks = 8;
  const size_t n = rets.size();
  if (n == 0 || n > kMaxLinks) return bad("a chain has 1 to " + std::to_string(kMaxLinks) + " links");
  if (args.size() != 1 + kPerLink * n) return bad("a chain of n links takes 1 + 6 n operands");
  if (prologue.size() != n || eps.size() != n || b_sf_layout.size() != n || b_packing.size() != n ||
      res_from.size() != n)
    return bad("a chain's attributes need one entry per link");
  Launch L[kMaxLinks];
  int64_t M[kMaxLinks], N[kMaxLinks], K[kMaxLinks];
  std::vector<ffi::AnyBuffer> outs;
  for (size_t i = 0; i < n; ++i) {
    auto r = rets.get<ffi::AnyBuffer>(i);
    if (!r.has_value()) return bad("result " + std::to_string(i) + " is not a buffer");
    outs.push_back(**r);
  }
  auto arg = [&](size_t i) { return args.get<ffi::AnyBuffer>(i); };
  for (size_t i = 0; i < n; ++i) {
    const std::string link = "jaxfp4 gemm chain (cuda), link " + std::to_string(i) + ": ";
    ffi::AnyBuffer ops[kPerLink] = {outs[0], outs[0], outs[0], outs[0], outs[0], outs[0]};  // placeholders
    for (size_t j = 0; j < kPerLink; ++j) {
      auto v = arg(1 + kPerLink * i + j);
      if (!v.has_value()) return bad(link + "operand " + std::to_string(j) + " is not a buffer");
      ops[j] = *v;
    }
    const ffi::AnyBuffer* residual = given(ops[5]);
    if (res_from[i] >= 0) {
      if (static_cast<size_t>(res_from[i]) >= i) return bad(link + "res_from must name an earlier link");
      if (residual != nullptr) return bad(link + "a residual operand and res_from both given");
      residual = &outs[res_from[i]];
    }
    ffi::AnyBuffer a = outs[0];
    if (i == 0) {
      auto a0 = arg(0);
      if (!a0.has_value()) return bad("a is not a buffer");
      a = *a0;
    } else {
      a = outs[i - 1];
    }
    if (auto e = prepare_fused(a, given(ops[0]), given(ops[1]), ops[2], ops[3], ops[4], residual, outs[i],
                               prologue[i], eps[i], b_sf_layout[i], b_packing[i], &L[i], &M[i], &N[i], &K[i]);
        e.failure()) {
      const std::string what = e.message(), prefix = "jaxfp4 gemm (cuda): ";  // bad()'s
      return ffi::Error::InvalidArgument(link + (what.rfind(prefix, 0) == 0 ? what.substr(prefix.size()) : what));
    }
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
                                  .RemainingArgs()  // a_0, then per link norm_w, a_g, b_data, b_scales, b_g, residual
                                  .RemainingRets()  // per link out [M, N_i]
                                  .Attr<ffi::Span<const int32_t>>("prologue")
                                  .Attr<ffi::Span<const float>>("eps")
                                  .Attr<ffi::Span<const int32_t>>("b_sf_layout")
                                  .Attr<ffi::Span<const int32_t>>("b_packing")
                                  .Attr<ffi::Span<const int32_t>>("res_from"),
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
