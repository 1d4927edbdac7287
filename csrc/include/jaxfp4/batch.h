// Leading batch axes shared by every FFI target: operands carry the same
// number of leading axes, each either the full size or 1 (broadcast), like
// numpy. BatchMap turns a flat output batch index into each operand's flat
// batch index. Host and device code use the same struct (passed by value).
#pragma once

#include <cstdint>

#include "jaxfp4/format.h"

namespace jaxfp4 {

constexpr int kMaxBatchRank = 8;

struct BatchMap {
  int rank = 0;
  int64_t count = 1;                   // product of out_dims
  int64_t out_dims[kMaxBatchRank] = {};
  int64_t a_strides[kMaxBatchRank] = {};  // 0 where the operand broadcasts
  int64_t b_strides[kMaxBatchRank] = {};

  JAXFP4_HD int64_t a_index(int64_t i) const { return index(i, a_strides); }
  JAXFP4_HD int64_t b_index(int64_t i) const { return index(i, b_strides); }

 private:
  JAXFP4_HD int64_t index(int64_t i, const int64_t* strides) const {
    int64_t r = 0;
    for (int d = rank - 1; d >= 0; --d) {
      r += (i % out_dims[d]) * strides[d];
      i /= out_dims[d];
    }
    return r;
  }
};

// Builds the map from the operands' leading dims (a_dims[0..rank), b_dims).
// Returns false when a pair of dims is neither equal nor 1, or rank is too big.
inline bool make_batch_map(const int64_t* a_dims, const int64_t* b_dims, int rank, BatchMap* out) {
  if (rank < 0 || rank > kMaxBatchRank) return false;
  BatchMap m;
  m.rank = rank;
  int64_t sa = 1, sb = 1;
  for (int d = rank - 1; d >= 0; --d) {
    const int64_t a = a_dims[d], b = b_dims[d];
    if (a != b && a != 1 && b != 1) return false;
    m.out_dims[d] = a == 1 ? b : a;  // numpy: (0, 1) -> 0
    m.a_strides[d] = a == 1 ? 0 : sa;
    m.b_strides[d] = b == 1 ? 0 : sb;
    sa *= a;
    sb *= b;
    m.count *= m.out_dims[d];
  }
  *out = m;
  return true;
}

}  // namespace jaxfp4
