// The small-M GEMM's host interface (gemm_small_m.cu): what a launch needs,
// the launch, and the tail every caller ends with (dimensions, launch, the
// kernel's name recorded). The FFI handlers (gemm_small_m_ffi.cu) and the
// kernel driver (benchmarks/kernel/gemm_small_m_driver.cu) build on it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "gemm_staged_act.cuh"  // Params, the prologues, the staged rows' limits
#include "xla/ffi/api/ffi.h"

namespace jaxfp4 {
namespace sm90_gemm {

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

// Launches the GEMM described by L (already validated); *name gets the kernel's name.
cudaError_t launch(const Launch& L, cudaStream_t stream, const char** name);

// An invalid-argument error of this family ("jaxfp4 gemm (cuda): ...").
inline xla::ffi::Error bad(const std::string& what) {
  return xla::ffi::Error::InvalidArgument("jaxfp4 gemm (cuda): " + what);
}

// Sets L's dimensions from M, N, K (rejecting ones too large for the kernels'
// 32-bit indices) and launches; an empty product launches nothing.
xla::ffi::Error finish(Launch& L, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace sm90_gemm
}  // namespace jaxfp4
