// The FFI targets each platform's sources export. registrations.cc turns them
// into PyCapsules for jax.ffi.register_ffi_target; the names are the
// contract with jaxfp4/_ffi.py (see csrc/README.md).
#pragma once

#include <vector>

namespace jaxfp4 {

struct FfiTarget {
  const char* name;      // e.g. "jaxfp4_quantize"
  void* handler;         // an XLA_FFI_Handler*
};

std::vector<FfiTarget> cpu_targets();   // csrc/cpu/*.cc
#if defined(JAXFP4_WITH_CUDA)
std::vector<FfiTarget> cuda_targets();  // csrc/cuda/ffi_cuda.cu
// Whether the CUDA kernels are launched as programmatic dependents
// (csrc/cuda/device.cuh; JAXFP4_PDL=0 turns it off, read at the first use).
bool cuda_pdl_enabled();                // csrc/cuda/ffi_cuda.cu
#endif

// Which kernel an op last ran, for jaxfp4.backend_info(). `op` is one of
// "quantize", "dequantize", "gemm"; both strings must have static storage.
void record_kernel(const char* op, const char* kernel);

}  // namespace jaxfp4
