// jaxfp4_quantize_decoded's launch for handlers that run it with other kernels
// in one call (gemm_small_m_ffi.cu's jaxfp4_gemm_w4a4_decoded). Defined in quantize.cu.
#pragma once

#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

namespace jaxfp4 {

// Validates, then launches the quantize_decoded kernel: out [*L, M, K] BF16 =
// e2m1(q) * SF of x quantized with g [*L], g_ab = g * g_b. A failed check
// launches nothing. programmatic: a programmatic dependent launch (device.cuh)
// or an ordinary one.
xla::ffi::Error run_quantize_decoded(cudaStream_t stream, const xla::ffi::AnyBuffer& x, const xla::ffi::AnyBuffer& g,
                                     const xla::ffi::AnyBuffer& g_b, xla::ffi::AnyBuffer out,
                                     xla::ffi::AnyBuffer g_ab, bool programmatic);

}  // namespace jaxfp4
