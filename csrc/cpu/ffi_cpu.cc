// cpu_targets(): the CPU handlers jaxfp4 registers for platform "cpu"
// (csrc/README.md lists each target's operands), the counterpart of
// cuda/ffi_cuda.cu. registrations.cc turns them into capsules.
#include <vector>

#include "jaxfp4/registry.h"
#include "xla/ffi/api/ffi.h"

// Defined in quantize.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4CpuQuantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4CpuQuantizeDynamic);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4CpuQuantizeDecoded);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4CpuDequantize);
// Defined in gemm.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4CpuGemmW4A4);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFp4CpuGemmW4A16);

std::vector<jaxfp4::FfiTarget> jaxfp4::cpu_targets() {
  return {
      {"jaxfp4_quantize", reinterpret_cast<void*>(JaxFp4CpuQuantize)},
      {"jaxfp4_quantize_dynamic", reinterpret_cast<void*>(JaxFp4CpuQuantizeDynamic)},
      {"jaxfp4_quantize_decoded", reinterpret_cast<void*>(JaxFp4CpuQuantizeDecoded)},
      {"jaxfp4_dequantize", reinterpret_cast<void*>(JaxFp4CpuDequantize)},
      {"jaxfp4_gemm_w4a4", reinterpret_cast<void*>(JaxFp4CpuGemmW4A4)},
      {"jaxfp4_gemm_w4a16", reinterpret_cast<void*>(JaxFp4CpuGemmW4A16)},
  };
}
