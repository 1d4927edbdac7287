// The nanobind module jaxfp4._jaxfp4: hands the FFI handlers to Python as
// capsules and reports which kernels ran.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <atomic>
#include <cstring>

#include "jaxfp4/registry.h"

namespace nb = nanobind;

namespace jaxfp4 {
namespace {

constexpr const char* kOps[] = {"quantize", "dequantize", "gemm"};
constexpr int kNumOps = sizeof(kOps) / sizeof(kOps[0]);
// One slot per op; handlers run on XLA's threads, hence atomics.
std::atomic<const char*> g_last_kernel[kNumOps];

nb::dict capsules(const std::vector<FfiTarget>& targets) {
  nb::dict d;
  for (const FfiTarget& t : targets) d[t.name] = nb::capsule(t.handler);
  return d;
}

}  // namespace

void record_kernel(const char* op, const char* kernel) {
  for (int i = 0; i < kNumOps; ++i) {
    if (std::strcmp(op, kOps[i]) == 0) g_last_kernel[i].store(kernel, std::memory_order_relaxed);
  }
}

}  // namespace jaxfp4

NB_MODULE(_jaxfp4, m) {
  m.doc() = "jaxfp4 native extension: XLA FFI handlers for NVFP4 quantize and GEMM";
  m.def("cpu_targets", [] { return jaxfp4::capsules(jaxfp4::cpu_targets()); },
        "FFI target name -> handler capsule for platform 'cpu'.");
  m.def("cuda_targets", [] {
#if defined(JAXFP4_WITH_CUDA)
        return jaxfp4::capsules(jaxfp4::cuda_targets());
#else
        return nb::dict();
#endif
      },
      "FFI target name -> handler capsule for platform 'CUDA' (empty without CUDA).");
  m.def("built_with_cuda", [] {
#if defined(JAXFP4_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
  m.def("pdl_enabled", [] {
#if defined(JAXFP4_WITH_CUDA)
    return jaxfp4::cuda_pdl_enabled();
#else
    return false;
#endif
  }, "Whether CUDA kernels are launched as programmatic dependents (JAXFP4_PDL=0: not).");
  m.def("kernels_run", [] {
    nb::dict d;
    for (int i = 0; i < jaxfp4::kNumOps; ++i) {
      const char* k = jaxfp4::g_last_kernel[i].load(std::memory_order_relaxed);
      if (k) d[jaxfp4::kOps[i]] = std::string(k);
    }
    return d;
  }, "op -> name of the native kernel that op last ran (ops that ran none are absent).");
}
