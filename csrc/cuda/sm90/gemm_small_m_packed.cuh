// The small-M GEMM for weights in jaxfp4.prepare_weights' sm90 order
// (b_packing = 1): decode's hot path. Included by gemm_small_m.cu, whose
// header comment describes the mma mapping, the exact dequantization and the
// packed order; this file only holds the kernel's main loop.
//
// Why a separate kernel: the packed order needs no guards (rows and K are
// zero-padded) and no per-element permutation, so the loop can be short. At
// M <= 32 the GEMM is bound by instruction issue and the integer (ALU) pipe
// long before DRAM (ncu on H200: ~60% issue-active, ALU pipe ~57% busy), so
// every instruction per chunk counts. Per warp, chunk of 64 K and 2 weight
// tiles (2048 weights) the loop spends about 150 instructions on the work
// itself (88 integer ops extracting codes, 32 HMUL2 applying the scales, 14
// converting the scales, 4 LDS, 8 * NT mma.sync) and about 40 on everything
// else: cp.async of the next ring stage, one wait, 2 * NT activation loads (L1
// hits: every group reads the same K slice), cursor updates. Warps' K slices
// are reduced in shared memory in a fixed order once per group
// (deterministic, no workspace, no atomics).
#pragma once

#ifndef JAXFP4_PK_WARPS
#define JAXFP4_PK_WARPS 16  // most warps (K slices) per CTA
#endif
#ifndef JAXFP4_PK_STAGES_N8
#define JAXFP4_PK_STAGES_N8 3  // ring stages per warp for M <= 8
#endif
#ifndef JAXFP4_PK_MINB_N8
#define JAXFP4_PK_MINB_N8 1  // CTAs per SM the register budget is sized for, M <= 8
#endif

namespace jaxfp4 {
namespace sm90_gemm {

constexpr int kPkWarps = JAXFP4_PK_WARPS;
// Ring geometry per token-tile count (H200 measurements, benchmarks/kernel/NOTES.md):
// one token tile (M <= 8) runs 2 chunks per loop trip (half the loop and ring
// overhead per weight) in a 3-stage ring; with 2 or 4 token tiles the extra
// activation registers would spill, so 1 chunk per trip in 4 stages.
template <int NT>
struct PkCfg {
  static constexpr int kCpi = NT == 1 ? 2 : 1;     // chunks of 64 K per ring stage ("item")
  static constexpr int kStages = NT == 1 ? JAXFP4_PK_STAGES_N8 : 4;  // ring stages per warp
  // CTAs per SM the registers are budgeted for (two, i.e. 64 registers, spill).
  static constexpr int kMinBlocks = NT == 1 ? JAXFP4_PK_MINB_N8 : 1;
  // Reduction buffers: two alternate by group (one barrier per group); with four
  // token tiles one (their size would crowd out the ring), and a second barrier.
  static constexpr int kRedBufs = NT == 4 ? 1 : 2;
  // One stage: the codes of kTPW tiles x kCpi chunks ([tile][chunk], 512 bytes
  // each), then their scales ([tile][chunk], 64 bytes each). Both are
  // contiguous per tile in the packed order, so a lane copies 16-byte pieces.
  static constexpr int kStageBytes = kTPW * kCpi * (kPackedChunkBytes + kPackedScaleBytes);
  static constexpr int kScalePieces = kTPW * kCpi * kPackedScaleBytes / 16;  // lanes that copy scales
  static_assert(kScalePieces <= 32, "one scale piece per lane");
};

// Shared memory of a CTA with `warps` warps: the reduction buffer, then the rings.
template <int NT>
constexpr size_t packed_smem_bytes(int warps) {
  return static_cast<size_t>(warps) *
         (PkCfg<NT>::kRedBufs * kTPW * NT * 4 * 32 * sizeof(float) + PkCfg<NT>::kStages * PkCfg<NT>::kStageBytes);
}

template <typename T, int NT, bool A4>
__global__ void __launch_bounds__(kPkWarps * 32, PkCfg<NT>::kMinBlocks)
    gemm_packed_kernel(const __grid_constant__ Params p) {
  constexpr int S = PkCfg<NT>::kStages;
  constexpr int kPkCpi = PkCfg<NT>::kCpi;
  constexpr int kPkStageBytes = PkCfg<NT>::kStageBytes;
  constexpr int kPkScalePieces = PkCfg<NT>::kScalePieces;
  constexpr int F = kTPW * NT * 4 * 32;  // floats of one warp's partial sums
  static_assert(S >= 2, "the ring needs two stages");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nwarps = blockDim.x >> 5;
  const int64_t z = blockIdx.z;
  const int64_t ia = p.map.a_index(z), ib = p.map.b_index(z);
  const int m0 = blockIdx.y * (8 * NT);
  // This CTA's groups of kTPW tiles: a balanced contiguous share.
  const int64_t groups = (static_cast<int64_t>(p.tiles) + kTPW - 1) / kTPW;
  const int g_begin = static_cast<int>(static_cast<int64_t>(blockIdx.x) * groups / gridDim.x);
  const int ngroups = static_cast<int>(static_cast<int64_t>(blockIdx.x + 1) * groups / gridDim.x) - g_begin;
  if (ngroups <= 0) return;  // uniform over the CTA
  // Warp w owns chunks c0 .. c0 + mine - 1 of every group (mine may be 0 for
  // the last warps; they still take part in the reductions).
  const int c0 = warp * p.chunks_per_warp;
  const int mine = max(0, min(p.chunks_per_warp, p.chunks - c0));

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* const red = reinterpret_cast<float*>(smem_raw);  // [kRedBufs][nwarps][F]
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + PkCfg<NT>::kRedBufs * nwarps * F * 4 +
                        warp * S * kPkStageBytes;

  // ---- producer: cp.async of the next item (group pg, chunk c0 + pi) ----------------
  const uint8_t* const b_base = p.b + ib * p.b_stride;
  const uint8_t* const bsf_base = p.b_sf + ib * p.b_sf_stride;
  const uint8_t* wsrc[kTPW];  // this lane's first 16 code bytes of each tile
  const uint8_t* ssrc;        // lanes < kPkScalePieces: one 16-byte piece of the scales
  constexpr int kPiecesPerTile = kPkCpi * kPackedScaleBytes / 16;
  auto point = [&](int grp) {
    // The second tile of an odd last group re-reads the last tile: never stored.
#pragma unroll
    for (int tp = 0; tp < kTPW; ++tp) {
      const int tile = min((g_begin + grp) * kTPW + tp, p.tiles - 1);
      wsrc[tp] = b_base + (static_cast<int64_t>(tile) * p.chunks + c0) * kPackedChunkBytes + lane * 16;
    }
    const int tile = min((g_begin + grp) * kTPW + min(lane / kPiecesPerTile, kTPW - 1), p.tiles - 1);
    ssrc = bsf_base + (static_cast<int64_t>(tile) * p.chunks + c0) * kPackedScaleBytes + (lane % kPiecesPerTile) * 16;
  };
  // Items per group: the warp's chunks in runs of kPkCpi (the last may be shorter).
  const int items = (mine + kPkCpi - 1) / kPkCpi;
  int pg = 0, pit = 0, qi = 0;  // next item to issue: group, item of the group, ring stage
  point(0);
  auto issue = [&]() {
    if (items > 0 && pg < ngroups) {
      const uint32_t dst = ring + qi * kPkStageBytes;
      const int nck = min(kPkCpi, mine - pit * kPkCpi);  // chunks in this item
      if (nck == kPkCpi) {
#pragma unroll
        for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
          for (int ci = 0; ci < kPkCpi; ++ci)
            cp_async16(dst + (tp * kPkCpi + ci) * kPackedChunkBytes + lane * 16, wsrc[tp] + ci * kPackedChunkBytes);
      } else {  // the short last item of a group: its first chunks only
#pragma unroll
        for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
          for (int ci = 0; ci < kPkCpi; ++ci)
            if (ci < nck)
              cp_async16(dst + (tp * kPkCpi + ci) * kPackedChunkBytes + lane * 16, wsrc[tp] + ci * kPackedChunkBytes);
      }
#pragma unroll
      for (int tp = 0; tp < kTPW; ++tp) wsrc[tp] += kPkCpi * kPackedChunkBytes;
      if (lane < kPkScalePieces && (lane % kPiecesPerTile) < 4 * nck)
        cp_async16(dst + kTPW * kPkCpi * kPackedChunkBytes + lane * 16, ssrc);
      ssrc += kPkCpi * kPackedScaleBytes;
      if (++pit == items) {
        pit = 0;
        if (++pg < ngroups) point(pg);
      }
    }
    cp_async_commit();  // one commit group per item, empty or not: wait_group counts items
    qi = qi + 1 == S ? 0 : qi + 1;
  };

  // ---- activations of chunk c0 (the same K slice for every group) ------------------------
  const uint8_t* ap[NT];
  const uint8_t* asp[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    // Tokens past M read token M-1: only their own output columns see them.
    const int64_t mm = min(m0 + 8 * nt + g, p.M - 1);
    if constexpr (A4) {
      ap[nt] = static_cast<const uint8_t*>(p.a) + ia * p.a_stride + mm * (p.K / 2) + static_cast<int64_t>(c0) * 32 +
               t * 8;
      asp[nt] = p.a_sf + ia * p.a_sf_stride + sf_offset(static_cast<SfLayout>(p.a_sf_layout), mm, t, p.C) +
                static_cast<int64_t>(c0) * p.a_sf_cstride;
    } else {
      ap[nt] = static_cast<const uint8_t*>(p.a) +
               (ia * p.a_stride + mm * p.K + static_cast<int64_t>(c0) * kChunk + t * 16) * 2;
      asp[nt] = nullptr;
    }
  }

  float acc[kTPW][NT][4];
#pragma unroll
  for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[tp][nt][j] = 0.0f;

  float alpha = p.b_g[ib] * 128.0f;
  if constexpr (A4) alpha = (p.a_g[ia] * p.b_g[ib]) * 16384.0f;
  const int64_t out_base = z * static_cast<int64_t>(p.M) * p.N;

  const bool full_k = p.C % 4 == 0;  // K is a whole number of chunks
  for (int k = 0; k < S - 1; ++k) issue();
  int qc = 0;  // ring stage of the item being computed
  for (int grp = 0; grp < ngroups; ++grp) {
    // Activation pointers of this item's first chunk (advanced per item, reset per group).
    const uint8_t* aq[NT];
    const uint8_t* asq[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      aq[nt] = ap[nt];
      asq[nt] = asp[nt];
    }
    for (int it = 0; it < items; ++it) {
      const int i0 = it * kPkCpi;
      // Activations first (L1/L2 hits): they land while the weights are dequantized.
      // Unpredicated unless the item is short or holds the last block of a ragged K.
      ActStage<NT, A4> at[kPkCpi];
      if (i0 + kPkCpi <= mine && (full_k || c0 + i0 + kPkCpi < p.chunks)) {
#pragma unroll
        for (int ci = 0; ci < kPkCpi; ++ci) load_act<NT, A4, false>(at[ci], aq, asq, ci, p.a_sf_cstride, true);
      } else {
#pragma unroll
        for (int ci = 0; ci < kPkCpi; ++ci) {
          const bool blk_ok = i0 + ci < mine && 4 * (c0 + i0 + ci) + t < p.C;
          load_act<NT, A4, true>(at[ci], aq, asq, ci, p.a_sf_cstride, blk_ok);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        aq[nt] += kPkCpi * (A4 ? kChunk / 2 : kChunk * 2);
        if constexpr (A4) asq[nt] += kPkCpi * p.a_sf_cstride;
      }
      cp_async_wait<S - 2>();  // this item's stage has landed (for this lane) ...
      __syncwarp();            // ... for every lane, and the stage read last item is free
      issue();
      const uint32_t src = ring + qc * kPkStageBytes;
#pragma unroll
      for (int ci = 0; ci < kPkCpi; ++ci) {
        if (ci == 0 || i0 + ci < mine) {  // uniform: the last item of a group may be short
          Stage st;
#pragma unroll
          for (int tp = 0; tp < kTPW; ++tp) {
            st.w[tp] = lds128(src + (tp * kPkCpi + ci) * kPackedChunkBytes + lane * 16);
            st.sf[tp] = lds_u16(src + kTPW * kPkCpi * kPackedChunkBytes + (tp * kPkCpi + ci) * kPackedScaleBytes +
                                lane * 2);
          }
          mma_chunk<T, NT, true, A4>(acc, st, at[ci]);
        }
      }
      qc = qc + 1 == S ? 0 : qc + 1;
    }
    // ---- the group's outputs: the warps' K slices added (a fixed tree: deterministic),
    // scaled, stored. With two reduction buffers alternating by group one barrier
    // per group suffices: a buffer is rewritten two groups later, after every
    // thread has passed the next group's barrier and so finished reading it.
    float* const rb = red + (PkCfg<NT>::kRedBufs == 2 ? (grp & 1) * nwarps * F : 0);
    const int tile0 = (g_begin + grp) * kTPW;
#pragma unroll
    for (int tp = 0; tp < kTPW; ++tp)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          rb[warp * F + ((tp * NT + nt) * 4 + j) * 32 + lane] = acc[tp][nt][j];
          acc[tp][nt][j] = 0.0f;
        }
    __syncthreads();
    for (int idx = threadIdx.x; idx < F; idx += blockDim.x) {
      float v[kPkWarps];
#pragma unroll
      for (int w = 0; w < kPkWarps; ++w) v[w] = w < nwarps ? rb[w * F + idx] : 0.0f;
#pragma unroll
      for (int h = 1; h < kPkWarps; h *= 2)
#pragma unroll
        for (int w = 0; w + h < kPkWarps; w += 2 * h) v[w] += v[w + h];
      const int ln = idx & 31, j = (idx >> 5) & 3, nt = (idx >> 7) % NT, tp = (idx >> 7) / NT;
      store_out(p, out_base, alpha, (tile0 + tp) * 16 + (ln >> 2) + 8 * (j >> 1), m0 + 8 * nt + 2 * (ln & 3) + (j & 1),
                v[0]);
    }
    if constexpr (PkCfg<NT>::kRedBufs == 1) __syncthreads();  // the buffer is read before it is rewritten
  }
  cp_async_wait<0>();
}

}  // namespace sm90_gemm
}  // namespace jaxfp4
