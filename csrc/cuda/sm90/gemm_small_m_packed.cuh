// The small-M GEMM for weights in jaxfp4.prepare_weights' sm90 order
// (b_packing = 1): decode's hot path. Included by gemm_small_m.cu, whose
// header comment describes the mma mapping, the exact dequantization and the
// packed order; this file only holds the kernel's main loop.
//
// Why a separate kernel: the packed order needs no guards (rows and K are
// zero-padded) and no per-element permutation, so the loop can be short. At
// M <= 32 the GEMM is bound by instruction issue long before DRAM (ncu on
// H200: DRAM ~30% busy, 60-66% issue-active with 4 warps per scheduler), so
// every instruction per weight counts.
//
// Warp specialisation. A CTA is `nc` consumer warps plus one producer warp.
// The producer (one lane) fills a CTA-wide ring of shared-memory stages with
// bulk copies (the TMA unit, no tensor map): a stage ("item") holds, for the
// group's kTPW tiles, the codes and scales of nc * kCpi consecutive chunks of
// 64 K, which are contiguous per tile in the packed order, so one item is four
// copies whatever the warp count. Consumer warp w takes chunks w * kCpi ..
// w * kCpi + kCpi - 1 of every item (K interleaved over the warps, item by
// item). Stages are handed over with mbarriers: `full` completes when the
// item's bytes have landed, `empty` when every consumer lane has read it.
// Before this, each warp copied its own stages (cp.async per lane, or bulk
// copies of its lane 0): about 100 producer instructions per item in every
// warp, a fifth of the loop (benchmarks/kernel/NOTES.md).
//
// At the end of a group the consumers' float32 partial sums are added in a
// fixed tree order through shared memory (deterministic, no workspace, no
// atomics) and stored; consumers synchronise on a named barrier that the
// producer does not join.
#pragma once

#include "gemm_staged_act.cuh"
#include "quantize_block.cuh"

#ifndef JAXFP4_PK_WARPS
#define JAXFP4_PK_WARPS 16  // most consumer warps (K slices) per CTA
#endif
#ifndef JAXFP4_PK_STAGES_N8
#define JAXFP4_PK_STAGES_N8 3  // ring stages for M <= 8
#endif
#ifndef JAXFP4_ACT_AHEAD_MAX_NT
#define JAXFP4_ACT_AHEAD_MAX_NT 2  // the most token tiles that load activations an item ahead
#endif
#ifndef JAXFP4_PK_CPI_N16
#define JAXFP4_PK_CPI_N16 1  // chunks per consumer warp and item for 8 < M <= 16
#endif
#ifndef JAXFP4_PK_STAGES_N16
#define JAXFP4_PK_STAGES_N16 4  // ring stages for 8 < M <= 16
#endif
#ifndef JAXFP4_PK_STAGES_N32
#define JAXFP4_PK_STAGES_N32 4  // ring stages for 16 < M <= 32
#endif
#ifndef JAXFP4_GO_AT_READY
#define JAXFP4_GO_AT_READY 1  // staged chain links: ring items copied before the rows are read
#endif
#ifndef JAXFP4_PK_CPI_N8
#define JAXFP4_PK_CPI_N8 2  // chunks per consumer warp and item for M <= 8
#endif

namespace jaxfp4 {
namespace sm90_gemm {

// Kernel-driver timelines (benchmarks/kernel/gemm_small_m_driver.cu `trace`):
// built with -DJAXFP4_TRACE, one lane stamps %globaltimer at fixed points of
// each CTA's life into jaxfp4_trace[blockIdx.x][slot]. Off in the extension.
#ifdef JAXFP4_TRACE
constexpr int kTraceSlots = 8;
__device__ unsigned long long jaxfp4_trace[1024 * kTraceSlots];
__device__ __forceinline__ void trace_stamp(int slot) {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  if (blockIdx.y == 0 && blockIdx.z == 0 && blockIdx.x < 1024) jaxfp4_trace[blockIdx.x * kTraceSlots + slot] = t;
}
#define JAXFP4_TRACE_AT(cond, slot) \
  do {                              \
    if (cond) trace_stamp(slot);    \
  } while (0)
#else
#define JAXFP4_TRACE_AT(cond, slot) \
  do {                              \
  } while (0)
#endif

constexpr int kPkWarps = JAXFP4_PK_WARPS;

// A warp's partial sums in its row of a reduction buffer. With 1-2 token tiles
// token-major: (tile tp, row r, token tok) at tok * kStashTok + 16 tp + r, a
// token's 32 rows in 36 floats, not 32, so that the lanes' stores of one mma
// C element (rows g, tokens 2t) fall in 32 different banks; the summing
// threads then read 32 consecutive rows of one token, as they store them. With
// 4 token tiles the mma fragment order (element ((tp NT + nt) 4 + j) 32 +
// lane): the token-major code made that kernel spill and run 5-7% slower (H100
// driver, M = 32), where it made M = 16 up to 5% faster.
constexpr int kStashTok = kTPW * 16 + 4;
template <int NT>
constexpr int stash_floats() {
  return NT == 4 ? kTPW * NT * 4 * 32 : 8 * NT * kStashTok;
}
template <int NT>
__device__ __forceinline__ void stash_rows(float* row, const float (&acc)[kTPW][NT][4], int lane) {
  if constexpr (NT == 4) {
    stash_acc(row, acc, lane);
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          row[(8 * nt + 2 * t + (j & 1)) * kStashTok + 16 * tp + 8 * (j >> 1) + g] = acc[tp][nt][j];
  }
}

// Element i of a group's reduction buffer (nc warps' rows of F floats) summed
// over the warps' K slices in a fixed tree order (deterministic). FULL: nc ==
// W (every consumer warp present, the usual launch): no load needs a predicate.
template <int NT, int W, bool FULL>
__device__ __forceinline__ float stash_sum(const float* rb, int nc, int i) {
  constexpr int F = stash_floats<NT>();
  float v[W];
#pragma unroll
  for (int w = 0; w < W; ++w) v[w] = FULL || w < nc ? rb[w * F + i] : 0.0f;
#pragma unroll
  for (int h = 1; h < W; h *= 2)
#pragma unroll
    for (int w = 0; w + h < W; w += 2 * h) v[w] += v[w + h];
  return v[0];
}

// A group's outputs (1-2 token tiles), summed and stored by the consumer
// threads one (row, token) each, for the `mv` tokens that exist only: M = 1
// has 32 outputs a group, not a token tile's 256, so decode's batch-1 groups
// sum on one warp, not eight. Threads run token-major over rows: a warp stores
// consecutive columns of one output row. PAIRED: the epilogues pairing rows r
// and r + 8 of a tile (kEpilogueSwiGluInterleaved: gate and up;
// kEpilogueRotaryKV: dims d and d + D/2), a thread a pair n = 8 tile + r;
// out_base counts N/2 columns.
template <int NT, int W, bool PAIRED, bool FULL>
__device__ __forceinline__ void store_group_as(const Params& p, const float* rb, int nc, int ntp, int mv,
                                               int64_t out_base, float alpha, int tile0, int m0) {
  const int lg = ntp == kTPW ? 5 - PAIRED : 4 - PAIRED;  // log2(a tile's outputs per token x ntp)
  for (int o = threadIdx.x; o < (mv << lg); o += nc * 32) {
    const int tok = o >> lg, rr = o & ((1 << lg) - 1);               // rr: (PAIRED ? 8 : 16) tp + r
    const int i = tok * kStashTok + (PAIRED ? rr + (rr & 8) : rr);  // 16 tp + r
    const float v = stash_sum<NT, W, FULL>(rb, nc, i);
    if constexpr (PAIRED) {
      const float hi = stash_sum<NT, W, FULL>(rb, nc, i + 8);  // row r + 8
      if (p.epilogue == kEpilogueRotaryKV) {
        store_rotary(p, alpha, tile0 * 8 + rr, m0 + tok, v, hi);
      } else {
        store_swiglu(p, out_base, alpha, tile0 * 8 + rr, m0 + tok, v, hi);
      }
    } else {
      store_out(p, out_base, alpha, tile0 * 16 + rr, m0 + tok, v);
    }
  }
}

// 4 token tiles (M = 17-32): every fragment element, in the stash's fragment
// order (rows and tokens past N and M are not stored). PAIRED: thread h takes
// elements j = 0, 1 (row r) with their j + 2 (row r + 8), stash elements idx and
// idx + 64, pair n = 8 tile + r.
template <int W, bool PAIRED>
__device__ __forceinline__ void store_group_nt4(const Params& p, const float* rb, int nc, int ntp, int64_t out_base,
                                                float alpha, int tile0, int m0) {
  constexpr int NT = 4;
  const int f_end = ntp * NT * 4 * 32;
  if constexpr (PAIRED) {
    for (int h = threadIdx.x; h < f_end / 2; h += nc * 32) {
      const int idx = (h & 63) | ((h >> 6) << 7);
      const int ln = idx & 31, j = (idx >> 5) & 3, nt = (idx >> 7) % NT, tp = (idx >> 7) / NT;
      const int n = (tile0 + tp) * 8 + (ln >> 2), m = m0 + 8 * nt + 2 * (ln & 3) + (j & 1);
      const float lo = stash_sum<NT, W, false>(rb, nc, idx), hi = stash_sum<NT, W, false>(rb, nc, idx + 64);
      if (p.epilogue == kEpilogueRotaryKV) {
        store_rotary(p, alpha, n, m, lo, hi);
      } else {
        store_swiglu(p, out_base, alpha, n, m, lo, hi);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < f_end; idx += nc * 32) {
      const int ln = idx & 31, j = (idx >> 5) & 3, nt = (idx >> 7) % NT, tp = (idx >> 7) / NT;
      store_frag(p, out_base, alpha, tile0, m0, tp, nt, j, ln, stash_sum<NT, W, false>(rb, nc, idx));
    }
  }
}

template <int NT, int W, bool PAIRED>
__device__ __forceinline__ void store_group(const Params& p, const float* rb, int nc, int ntp, int mv,
                                            int64_t out_base, float alpha, int tile0, int m0) {
  if constexpr (NT == 4) {
    store_group_nt4<W, PAIRED>(p, rb, nc, ntp, out_base, alpha, tile0, m0);
  } else if (nc == W) {  // uniform over the CTA
    store_group_as<NT, W, PAIRED, true>(p, rb, nc, ntp, mv, out_base, alpha, tile0, m0);
  } else {
    store_group_as<NT, W, PAIRED, false>(p, rb, nc, ntp, mv, out_base, alpha, tile0, m0);
  }
}

// Ring geometry per token-tile count (H100/H200 measurements, benchmarks/kernel/NOTES.md):
// one token tile (M <= 8) runs 2 chunks per warp and item (half the loop
// overhead per weight); with 2 token tiles 2 chunks no longer spill but were
// 2-12% slower (session 16), with 4 they spill, so 1 chunk. More stages than 4
// at 2-4 token tiles were slower too (their shared memory is L1 the
// activations' re-reads use).
template <int NT>
struct PkCfg {
  static constexpr int kWarps = kPkWarps;       // most consumer warps
  static constexpr int kCpi = NT == 1 ? JAXFP4_PK_CPI_N8 : NT == 2 ? JAXFP4_PK_CPI_N16 : 1;  // chunks per warp and item
  static constexpr int kStages = NT == 1 ? JAXFP4_PK_STAGES_N8 : NT == 2 ? JAXFP4_PK_STAGES_N16 : JAXFP4_PK_STAGES_N32;
  // The producer asks for ring item kFirstLands only once item 0 has landed (-1:
  // the whole ring at once). With 2 token tiles the first of four 18 KB items
  // then lands sooner (fewer bytes asked for over the grid at once) and the
  // consumers start earlier: H100 driver, M = 16, no PDL, 18.85 -> 18.12 us
  // (4096x14336), 33.5 -> 32.7 (28672x4096); at 1 token tile (3 items of 37 KB)
  // it was up to 2% slower, and waiting before item 1 slower at both.
  static constexpr int kFirstLands = NT == 2 ? 2 : -1;
  // Reduction buffers: two alternate by group (one barrier per group); with four
  // token tiles one (their size would crowd out the ring), and a second barrier.
  static constexpr int kRedBufs = NT == 4 ? 1 : 2;
  // Chunks one stage holds per tile (the most consumer warps x kCpi).
  static constexpr int kStageChunks = kWarps * kCpi;
  // One stage: [tile][chunk] codes (512 bytes each), then [tile][chunk] scales (64 bytes each).
  static constexpr int kStageBytes = kTPW * kStageChunks * (kPackedChunkBytes + kPackedScaleBytes);
};

// Shared memory of a CTA with `nc` consumer warps: the reduction buffers, the
// ring, then its mbarriers (full and empty per stage).
template <int NT>
constexpr size_t packed_smem_bytes(int nc) {
  return static_cast<size_t>(nc) * PkCfg<NT>::kRedBufs * stash_floats<NT>() * sizeof(float) +
         static_cast<size_t>(PkCfg<NT>::kStages) * (PkCfg<NT>::kStageBytes + 16) + 16;  // + the `go` barrier
}

// ---- W4A4 with the activation quantization inside the kernel (QA) -------------
// For M <= 8 bf16 activations with a static decode scale g_a: the consumers
// quantize the CTA's rows once, exactly as the quantize kernel does (the same
// quantize_block.cuh code), decode them as the W4A4 kernel decodes activation
// codes (times 2^-7, the same instructions) and keep the bf16 values in shared
// memory, from which the main loop takes its B fragments as W4A16 does. So the
// products, their order and the epilogue are the W4A4 kernel's: the result is
// bit for bit that of jaxfp4.quantize then the W4A4 GEMM, without the quantize
// launch and without per-chunk activation decoding.

// Where the main loop takes its activations (the kernel's ACT parameter).
enum ActSource : int {
  kActGlobal = 0,    // from global memory, chunk by chunk (L1/L2 hits)
  kActQuantize = 1,  // QA: staged in shared memory, quantized there (W4A4 from bf16)
  kActFused = 2,     // staged by a fused prologue (gemm_staged_act.cuh; W4A16)
};

// Rows 0 .. min(M, 8) - 1 of the CTA's activation entry quantized with g = a_g,
// dequantized into `act` (gemm_staged_act.cuh's rows), by `nthreads` threads,
// this one `tid`. in_place: the rows are already staged in `act` (a fused
// prologue's output) and each block is quantized where it lies.
__device__ __forceinline__ void qa_quantize_rows(const Params& p, int64_t ia, unsigned char* act, int tid,
                                                 int nthreads, bool in_place = false) {
  namespace qb = quantize_block;
  const int rows = min(p.M, 8), C = p.C, cp = 4 * p.chunks;  // blocks per row incl. the chunk padding
  const int64_t stride = qa_row_bytes(p.K);
  const float gs = 1.0f / p.a_g[ia], inv_gs = 1.0f / gs;  // as the quantize kernel's kOneG path
  const void* a = static_cast<const uint16_t*>(p.a) + ia * p.a_stride;
  for (int b = tid; b < rows * cp; b += nthreads) {
    const int r = b / cp, c = b - r * cp;
    uint32_t o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (c < C) {
      qb::Block16<__nv_bfloat16_raw> blk;
      if (in_place) {  // this thread's own 32 bytes: read, then overwritten below
        const uint4* src = reinterpret_cast<const uint4*>(act + r * stride + 32 * c);
        const uint4 lo = src[0], hi = src[1];
        const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) blk.w[i] = w[i];
      } else {
        blk.load(a, static_cast<uint32_t>(r * C + c));
      }
      // Exactly as quantize_kernel (block_scale, block_output_scale, the codes).
      const float vmax = blk.abs_max();
      const uint32_t sf = qb::block_scale_hw(vmax, gs);
      const uint2 q = qb::encode16(blk, vmax, qb::block_output_scale_hw(sf, inv_gs));
      // mma_chunk's W4A4 activation decoding: pairs (j, j+4) times SF 2^-7, then in order.
      uint32_t s0, s1;
      scale_pair<__nv_bfloat16>(sf, s0, s1);
      const uint32_t words[2] = {q.x, q.y};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t v[4];
        codes4<false, false>(words[h], v);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = mul2<__nv_bfloat16>(v[j], s0);
        o[4 * h] = prmt(v[0], v[1], 0x5410);
        o[4 * h + 1] = prmt(v[2], v[3], 0x5410);
        o[4 * h + 2] = prmt(v[0], v[1], 0x7632);
        o[4 * h + 3] = prmt(v[2], v[3], 0x7632);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(act + r * stride + 32 * c);
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
  }
}

// Bulk copies (sm_90's TMA unit, no tensor map): global -> shared, completing
// on an mbarrier that counts the bytes. The CTA is its own cluster, so its
// shared::cta addresses are valid shared::cluster ones.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// The producer's arrival on a `full` barrier, adding the bytes to wait for.
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Weights are read once: their lines go first when L2 needs room, so the
// stream does not push out what the next call reads again at its start (its
// code, parameters and activations; the previous layer's outputs). H100
// driver, back to back without PDL (as between XLA's calls): M = 16 4096x14336
// 18.2 -> 16.6 us, 28672x4096 32.9 -> 31.8; M = 1 -0.5 to -0.9 us
// (benchmarks/kernel/NOTES.md, session 20).
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;"
      :
      : "r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(pol)
      : "memory");
}
// Asks L2 for this CTA's 1/gridDim share of `bytes` bytes at `base` (a hint:
// a share not 16-byte aligned is skipped, a tail under 16 bytes not asked for).
__device__ __forceinline__ void prefetch_l2_share(const void* base, int64_t bytes) {
  const int64_t part = ((bytes + gridDim.x - 1) / gridDim.x + 15) & ~int64_t{15};
  const int64_t start = static_cast<int64_t>(blockIdx.x) * part;
  const int64_t len = min(part, bytes - start) & ~int64_t{15};
  const char* src = static_cast<const char*>(base) + start;
  if (len <= 0 || (reinterpret_cast<uintptr_t>(src) & 15) != 0) return;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(static_cast<uint32_t>(len)) : "memory");
}
// Spins until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{ .reg .pred done;\n"
      "  POLL: mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "  @!done bra POLL; }" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// A consumer lane's arrival on a stage's `empty` barrier (release: its reads of
// the stage happen before the producer's next copies into it).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// PAIRED_OUT: the store is an epilogue pairing rows r and r + 8 (p.epilogue:
// kEpilogueSwiGluInterleaved or kEpilogueRotaryKV; bf16 W4A16 only). A template
// flag, not a branch on p.epilogue in every kernel: with the branch the ordinary
// kernels' register allocation changed (an 8-byte spill at 4 token tiles; driver,
// H100: 1-3% slower at M = 16).
template <typename T, int NT, bool A4, int ACT = kActGlobal, bool PAIRED_OUT = false>
__global__ void __launch_bounds__((PkCfg<NT>::kWarps + 1) * 32, 1) gemm_packed_kernel(const __grid_constant__ Params p) {
  static_assert(ACT == kActGlobal || (NT == 1 && !A4 && std::is_same<T, __nv_bfloat16>::value),
                "activations staged in shared memory: M <= 8, bf16 operands");
  static_assert(!PAIRED_OUT || (!A4 && std::is_same<T, __nv_bfloat16>::value), "the paired epilogues: bf16 W4A16");
  constexpr bool QA = ACT == kActQuantize;
  using Cfg = PkCfg<NT>;
  constexpr int S = Cfg::kStages;
  constexpr int kCpi = Cfg::kCpi;
  constexpr int kSC = Cfg::kStageChunks;
  constexpr int F = stash_floats<NT>();  // floats of one warp's partial sums
  static_assert(S >= 2, "the ring needs two stages");
  const int lane = threadIdx.x & 31;
  // Broadcast from lane 0, so the compiler knows the warp index is the same in
  // every lane: what derives from it lives in uniform registers.
  const int warp = __shfl_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x >> 5), 0);
  const int g = lane >> 2, t = lane & 3;
  const int nc = (blockDim.x >> 5) - 1;  // consumer warps; warp nc is the producer
  JAXFP4_TRACE_AT(threadIdx.x == 0, 0);
  const Prologue<NT, A4> pro(p, warp, g, t);  // (p.chunks_per_warp = kCpi: c0 = warp * kCpi)
  // The CTA's weight tiles: a balanced contiguous share of single tiles, not of
  // groups, walked kTPW at a time (an odd share ends with a one-tile group).
  // With whole groups the slowest CTA can take a group more than the average:
  // 10240 rows are 640 tiles, 4.85 per CTA on 132 SMs, but 2 or 3 groups (4 or
  // 6 tiles); by tiles it takes 4 or 5.
  int t_begin, t_end;
  cta_share(p.tiles, t_begin, t_end);
  const int ngroups = (t_end - t_begin + kTPW - 1) / kTPW;
  // A programmatic dependent launch of the next GEMM may begin as soon as every
  // CTA is here: its CTAs take the SMs ours leave, and stream their weights
  // into L2 while ours finish (they wait for our outputs before reading them).
  allow_dependent_launch();
  if (ngroups <= 0) return;  // uniform over the CTA
  const int items = p.items;  // ring items per group: ceil(chunks / (nc * kCpi))

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* const red = reinterpret_cast<float*>(smem_raw);  // [kRedBufs][nc][F]
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + Cfg::kRedBufs * nc * F * 4;
  const uint32_t full = ring + S * Cfg::kStageBytes;  // [S] mbarriers, then empty [S]
  const uint32_t empty = full + 8 * S;
  // Staged kernels: the consumers' rows are read before the ring's first copies
  // (below); every consumer lane arrives once its first loads are issued.
  const uint32_t go = empty + 8 * S;
  // Staged activations (QA, fused prologues), after the barriers (16-byte aligned).
  unsigned char* const act = smem_raw + Cfg::kRedBufs * nc * F * 4 + S * (Cfg::kStageBytes + 16) + 16;
  if (warp == nc && lane == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(full + 8 * i, 1);        // the producer's arrival (+ the bytes)
      mbar_init(empty + 8 * i, nc * 32);  // every consumer lane
    }
    mbar_init(go, nc * 32);
    fence_mbar_init();  // initialised before the bulk copies and the other warps use them
  }
  __syncthreads();
  JAXFP4_TRACE_AT(threadIdx.x == 0, 1);

  if (warp == nc) {
    // ---- producer: one lane walks (group, item) and copies each item into the
    // next stage once its consumers have released it.
    if (lane != 0) return;
    const int64_t tile_chunks = p.chunks;
    const uint8_t* const b = p.b + pro.ib * p.b_stride;
    const uint8_t* const b_sf = p.b_sf + pro.ib * p.b_sf_stride;
    // Item n of the CTA's walk (group n / items, item n % items): its tiles
    // (a one-tile group copies one), chunks, and the first tile's first chunk.
    struct Item {
      int ntp, nck;
      int64_t src;
    };
    auto item_at = [&](int n) {
      const int grp = n / items, c = (n - grp * items) * nc * kCpi;
      return Item{min(kTPW, t_end - (t_begin + grp * kTPW)), min(nc * kCpi, p.chunks - c),
                  (static_cast<int64_t>(t_begin) + grp * kTPW) * tile_chunks + c};
    };
    const int nitems = ngroups * items;
    // No copy before the previous kernel has finished (programmatic dependent
    // launch) where the weights might be its output; a later link of a chain
    // knows they are not (weights_ready) and fills its ring while the link
    // before it finishes. No L2 prefetch of the first ring-full instead: it goes
    // through the same copy engine, ahead of the copies, and where the launch
    // does not overlap (always under XLA's command buffers) it delayed the first
    // item by ~1 us and cost 0.5-2 us a GEMM (benchmarks/kernel/NOTES.md,
    // sessions 13 and 14).
    if (!p.weights_ready) grid_dependency_wait();
    // A staged kernel's rows (a few KB every CTA needs before its first item) are
    // read before the ring's copies (the producer waits on `go` before item
    // go_at): issued behind the first copies (~55 KB a CTA, 7 MB over the grid)
    // their latency was the copies', and the prologue cost 2-2.7 us a call at
    // M = 1. A chain's later link (weights_ready) copies its first item before
    // that wait, at its CTAs' start, while the previous link's last CTAs still
    // run: 28672x4096 with the RMSNorm prologue 28.4 -> 26.8 us, 6144x4096 9.4
    // -> 9.1 (4096x4096, one item a CTA less to hide: 7.3 -> 7.5; H100 driver,
    // benchmarks/kernel/NOTES.md sessions 17 and 18).
    const int go_at = ACT == kActGlobal ? -1 : p.weights_ready ? JAXFP4_GO_AT_READY : 0;
    const uint64_t pol = l2_evict_first_policy();
    int qi = 0;
    uint32_t ph = 1;  // parity to wait for on `empty`: a fresh barrier's previous phase counts as complete
    for (int n = 0; n < nitems; ++n) {
      const Item w = item_at(n);
      if (n == go_at) mbar_wait(go, 0);
      if (n == Cfg::kFirstLands) mbar_wait(full, 0);  // item 0 has landed (its phase 0)
      mbar_wait(empty + 8 * qi, ph);
      const uint32_t dst = ring + qi * Cfg::kStageBytes, bar = full + 8 * qi;
      mbar_expect_tx(bar, w.ntp * w.nck * (kPackedChunkBytes + kPackedScaleBytes));
      for (int tp = 0; tp < w.ntp; ++tp) {
        const int64_t src = w.src + tp * tile_chunks;
        bulk_copy(dst + tp * kSC * kPackedChunkBytes, b + src * kPackedChunkBytes, w.nck * kPackedChunkBytes, bar, pol);
        bulk_copy(dst + kTPW * kSC * kPackedChunkBytes + tp * kSC * kPackedScaleBytes, b_sf + src * kPackedScaleBytes,
                  w.nck * kPackedScaleBytes, bar, pol);
      }
      if (ACT == kActGlobal && NT <= 2 && n == 0 && !p.weights_ready) {
        // Every CTA reads all of its token block's activation rows, item by
        // item in the same K order; where they are not in L2 yet (written
        // long before, or a fresh input) each item's first reads wait on
        // HBM. So the grid asks for them at once, a share per CTA, behind
        // the first item's copies (a chain's later link reads the previous
        // link's output, already in L2). H100 protocol (cold activations):
        // W4A16 M = 16 4096x14336 18.3 -> 16.2 us, 28672x4096 32.4 -> 31.2;
        // M = 1-8 up to -1.5%. Not at 4 token tiles: there the decode example
        // (warm activations) ran 5% slower with it at batch 32 (3.54 -> 3.71
        // ms a token, same run), though the protocol's M = 32 gained 3-5%.
        const int rows = min(p.M - pro.m0, 8 * NT);
        const int64_t row_bytes = A4 ? p.K / 2 : int64_t{2} * p.K;
        prefetch_l2_share(static_cast<const uint8_t*>(p.a) + pro.ia * p.a_stride * (A4 ? 1 : 2) + pro.m0 * row_bytes,
                          rows * row_bytes);
      }
      if (++qi == S) {
        qi = 0;
        ph ^= 1u;
      }
    }
    JAXFP4_TRACE_AT(true, 6);  // the last copy issued
    return;
  }

  // ---- consumers ---------------------------------------------------------------------
  grid_dependency_wait();  // before the first read of a, the scales' g, the residual, or a store
  float acc[kTPW][NT][4];
  zero_acc(acc);
  float alpha = epilogue_alpha<A4>(p, pro.ia, pro.ib);
  uint32_t act_lane = 0;  // staged: shared address of the lane's token row at chunk c0, slot t
  if constexpr (QA) {
    // While the producer fills the ring: the activations, quantized once per CTA.
    // (Its loads sit inside its loop: the producer waiting for all of it was
    // slower, +0.5-0.9 us at M = 1 in the driver, so the ring starts at once.)
    mbar_arrive(go);
    qa_quantize_rows(p, pro.ia, act, static_cast<int>(threadIdx.x), nc * 32);
    consumers_sync(nc);
    alpha = epilogue_alpha<true>(p, pro.ia, pro.ib);  // the W4A4 kernel's (activations times 2^-7)
  } else if constexpr (ACT == kActFused) {
    // While the producer fills the ring: the prologue's rows (the reduction
    // buffers, unused until the first group ends, hold the RMSNorm's warp sums).
    const auto issued = [go] { mbar_arrive(go); };
    if (p.prologue == kPrologueRmsNorm) {
      rms_norm_rows(p, act, red, static_cast<int>(threadIdx.x), nc, issued);
    } else {
      swiglu_rows(p, act, static_cast<int>(threadIdx.x), nc, issued);
    }
    if (p.a_g != nullptr) {  // W4A4: the staged rows quantized in place, as QA quantizes a
      qa_quantize_rows(p, pro.ia, act, static_cast<int>(threadIdx.x), nc * 32, true);
      consumers_sync(nc);
      alpha = epilogue_alpha<true>(p, pro.ia, pro.ib);
    }
  }
  if constexpr (ACT != kActGlobal) {
    act_lane = static_cast<uint32_t>(__cvta_generic_to_shared(act)) +
               static_cast<uint32_t>(min(g, p.M - 1) * qa_row_bytes(p.K) + pro.c0 * kChunk * 2 + t * 32);
  }
  const int64_t out_base = pro.z * static_cast<int64_t>(p.M) * p.N;
  const int64_t item_act = static_cast<int64_t>(nc) * kCpi * (A4 ? kChunk / 2 : kChunk * 2);  // bytes per item
  const int64_t item_asf = static_cast<int64_t>(nc) * kCpi * p.a_sf_cstride;

  // Activations from global memory are loaded one item ahead (kAhead) with 1-2
  // token tiles: loaded right before use, their L2 latency was exposed after one
  // item's dequantization (H100 driver, M = 1-8: 1.5-8% faster ahead, most on
  // the small 4096- and 6144-row weights; at 2 token tiles it paid only beside
  // the token-major reduction, M = 16 28672x4096 32.8 -> 31.3 us,
  // benchmarks/kernel/NOTES.md session 19). With 4 the extra registers spill.
  constexpr bool kAhead = ACT == kActGlobal && NT <= JAXFP4_ACT_AHEAD_MAX_NT;
  // The lane's activations of K item `ik` (of any group: every group walks the same K).
  auto load_item = [&](ActStage<NT, A4>(&dst)[kCpi], const uint8_t* const (&aq)[NT],
                       const uint8_t* const (&asq)[NT], int ik) {
    const int c = ik * nc * kCpi + warp * kCpi;
    const int mine = min(kCpi, p.chunks - c);
    if (mine == kCpi && (p.C % 4 == 0 || c + kCpi < p.chunks)) {
#pragma unroll
      for (int ci = 0; ci < kCpi; ++ci) load_act<NT, A4, false>(dst[ci], aq, asq, ci, p.a_sf_cstride, true);
    } else {
#pragma unroll
      for (int ci = 0; ci < kCpi; ++ci) {
        const bool blk_ok = ci < mine && 4 * (c + ci) + t < p.C;
        load_act<NT, A4, true>(dst[ci], aq, asq, ci, p.a_sf_cstride, blk_ok);
      }
    }
  };
  auto load_item_at = [&](ActStage<NT, A4>(&dst)[kCpi], int ik) {  // pointers from ik
    const uint8_t* aq[NT];
    const uint8_t* asq[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      aq[nt] = pro.ap[nt] + ik * item_act;
      asq[nt] = A4 ? pro.asp[nt] + ik * item_asf : pro.asp[nt];
    }
    load_item(dst, aq, asq, ik);
  };
  ActStage<NT, A4> ahead[kCpi];
  if constexpr (kAhead) load_item_at(ahead, 0);

  int qc = 0;          // ring stage of the item being computed
  uint32_t phase = 0;  // `full` parity of the ring's current round
  for (int grp = 0; grp < ngroups; ++grp) {
    const int tile0 = t_begin + grp * kTPW;
    const bool pair = tile0 + 1 < t_end;  // uniform over the CTA: else a one-tile group
    // Without kAhead: activation pointers of this item's first chunk (advanced per
    // item, reset per group; fewer registers than pointers computed per item).
    const uint8_t* aq[NT];
    const uint8_t* asq[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      aq[nt] = pro.ap[nt];
      asq[nt] = pro.asp[nt];
    }
    for (int it = 0; it < items; ++it) {
      const int c = it * nc * kCpi + warp * kCpi;  // this warp's first chunk of the item
      const int mine = min(kCpi, p.chunks - c);     // its chunks in the item (<= 0: none)
      // Activations first (L1/L2 hits): they land while the weights are dequantized.
      // Unpredicated unless the warp's chunks are short or hold the last block of a ragged K.
      ActStage<NT, A4> at[kCpi];
      if constexpr (ACT != kActGlobal) {
        // Rows are zero-padded to whole chunks; chunks past K are not read (not computed).
        const uint32_t a0 = act_lane + static_cast<uint32_t>(it) * nc * kCpi * kChunk * 2;
#pragma unroll
        for (int ci = 0; ci < kCpi; ++ci) {
          const bool in = ci < mine;  // uniform over the warp
          at[ci].act[0][0] = in ? lds128(a0 + ci * kChunk * 2) : make_uint4(0, 0, 0, 0);
          at[ci].act[0][1] = in ? lds128(a0 + ci * kChunk * 2 + 16) : make_uint4(0, 0, 0, 0);
        }
      } else if constexpr (kAhead) {
#pragma unroll
        for (int ci = 0; ci < kCpi; ++ci) at[ci] = ahead[ci];
        if (it + 1 < items) {
          load_item_at(ahead, it + 1);
        } else if (grp + 1 < ngroups) {
          load_item_at(ahead, 0);  // the next group's first item
        }
      } else {  // from global memory, not ahead
        load_item(at, aq, asq, it);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          aq[nt] += item_act;
          if constexpr (A4) asq[nt] += item_asf;
        }
      }
      mbar_wait(full + 8 * qc, phase);  // this item's bytes have landed
      JAXFP4_TRACE_AT(threadIdx.x == 0 && grp == 0 && it == 0, 2);
      JAXFP4_TRACE_AT(threadIdx.x == 0 && grp == ngroups - 1 && it == items - 1, 3);
      const uint32_t src = ring + qc * Cfg::kStageBytes;
      // Every chunk's shared-memory loads first, so their latencies overlap (a
      // chunk past the warp's share reads stale bytes that are never used).
      Stage st[kCpi];
#pragma unroll
      for (int ci = 0; ci < kCpi; ++ci) {
        const int sc = warp * kCpi + ci;  // the chunk's slot in the stage
#pragma unroll
        for (int tp = 0; tp < kTPW; ++tp) {
          st[ci].w[tp] = lds128(src + (tp * kSC + sc) * kPackedChunkBytes + lane * 16);
          st[ci].sf[tp] =
              lds_u16(src + kTPW * kSC * kPackedChunkBytes + (tp * kSC + sc) * kPackedScaleBytes + lane * 2);
        }
      }
      if (pair) {
#pragma unroll
        for (int ci = 0; ci < kCpi; ++ci)
          if (ci < mine) mma_chunk<T, NT, true, A4>(acc, st[ci], at[ci]);  // uniform over the warp
      } else {  // one tile: half the math (its acc[1] stays zero and is not stored)
#pragma unroll
        for (int ci = 0; ci < kCpi; ++ci)
          if (ci < mine) mma_chunk<T, NT, true, A4, 1>(acc, st[ci], at[ci]);
      }
      mbar_arrive(empty + 8 * qc);  // this lane is done with the stage
      JAXFP4_TRACE_AT(lane == 0 && (warp == 0 || warp == nc - 1) && grp == ngroups - 1 && it == items - 1,
                      warp == 0 ? 4 : 7);
      if (++qc == S) {
        qc = 0;
        phase ^= 1u;  // the ring's next round
      }
    }
    // ---- the group's outputs: the warps' K slices added (a fixed tree: deterministic),
    // scaled, stored. With two reduction buffers alternating by group one barrier
    // per group suffices: a buffer is rewritten two groups later, after every
    // consumer has passed the next group's barrier and so finished reading it.
    float* const rb = red + (Cfg::kRedBufs == 2 ? (grp & 1) * nc * F : 0);
    stash_rows(rb + warp * F, acc, lane);
    zero_acc(acc);
    consumers_sync(nc);
    // A one-tile group stores its first tile only (the next tile is another CTA's).
    store_group<NT, Cfg::kWarps, PAIRED_OUT>(p, rb, nc, pair ? kTPW : 1, min(p.M - pro.m0, 8 * NT),
                                             PAIRED_OUT ? out_base / 2 : out_base, alpha, tile0, pro.m0);
    if constexpr (Cfg::kRedBufs == 1) consumers_sync(nc);  // the buffer is read before it is rewritten
  }
  JAXFP4_TRACE_AT(threadIdx.x == 0, 5);
}

}  // namespace sm90_gemm
}  // namespace jaxfp4
