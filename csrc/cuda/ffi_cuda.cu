// cuda_targets(): the CUDA handlers jaxfp4 registers for platform "CUDA"
// (csrc/README.md lists each target's operands). registrations.cc turns them
// into capsules; jaxfp4/_ffi.py registers them with jax.ffi.
#include <vector>

// This file is compiled only into CUDA builds: make registry.h declare cuda_targets().
#ifndef JAXFP4_WITH_CUDA
#define JAXFP4_WITH_CUDA 1
#endif
#include "device.cuh"
#include "jaxfp4/registry.h"
#include "xla/ffi/api/ffi.h"

// Defined in csrc/cuda/sm90/quantize.cu.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4QuantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4QuantizeDynamicCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4QuantizeDecodedCuda);
// Defined in csrc/cuda/sm90/gemm_small_m_ffi.cu.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4GemmW4A4Cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4GemmW4A16Cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4GemmW4A4QuantizeACuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4GemmFusedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4GemmChainCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4GemmW4A4DecodedCuda);
// Defined in csrc/cuda/bench_stream.cu.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4BenchStreamReadCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4BenchClockCuda);

namespace jaxfp4 {

std::vector<FfiTarget> cuda_targets() {
  return {
      {"jaxfp4_quantize", reinterpret_cast<void*>(&JaxFp4QuantizeCuda)},
      {"jaxfp4_quantize_dynamic", reinterpret_cast<void*>(&JaxFp4QuantizeDynamicCuda)},
      {"jaxfp4_quantize_decoded", reinterpret_cast<void*>(&JaxFp4QuantizeDecodedCuda)},
      {"jaxfp4_gemm_w4a4", reinterpret_cast<void*>(&JaxFp4GemmW4A4Cuda)},
      {"jaxfp4_gemm_w4a16", reinterpret_cast<void*>(&JaxFp4GemmW4A16Cuda)},
      {"jaxfp4_gemm_w4a4_quantize_a", reinterpret_cast<void*>(&JaxFp4GemmW4A4QuantizeACuda)},
      {"jaxfp4_gemm_fused", reinterpret_cast<void*>(&JaxFp4GemmFusedCuda)},
      {"jaxfp4_gemm_chain", reinterpret_cast<void*>(&JaxFp4GemmChainCuda)},
      {"jaxfp4_gemm_w4a4_decoded", reinterpret_cast<void*>(&JaxFp4GemmW4A4DecodedCuda)},
      {"jaxfp4_bench_stream_read", reinterpret_cast<void*>(&JaxFp4BenchStreamReadCuda)},
      {"jaxfp4_bench_clock", reinterpret_cast<void*>(&JaxFp4BenchClockCuda)},
  };
}

bool cuda_pdl_enabled() { return pdl_enabled(); }

}  // namespace jaxfp4
