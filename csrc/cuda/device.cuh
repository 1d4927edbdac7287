// Host-side device queries shared by the CUDA handlers: cached per device so
// that a launch never pays a driver query twice (and never synchronizes).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <utility>

namespace jaxfp4 {

constexpr int kMaxDevices = 64;

// Index of `dev` into per-device caches (out-of-range ids share slot 0).
inline int device_slot(int dev) { return dev >= 0 && dev < kMaxDevices ? dev : 0; }

// The current device (0 if the query fails; the error is cleared).
inline int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    dev = 0;
  }
  return dev;
}

// Number of SMs of `dev`, cached; 132 (an H100/H200) if the query fails.
inline int sm_count(int dev) {
  static std::atomic<int> cache[kMaxDevices];
  std::atomic<int>& cached = cache[device_slot(dev)];
  int n = cached.load(std::memory_order_relaxed);
  if (n <= 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      return 132;
    }
    cached.store(n, std::memory_order_relaxed);
  }
  return n;
}

inline int sm_count() { return sm_count(current_device()); }

// CTAs of `kernel` (a __global__ function) one SM of `dev` holds at `threads`
// threads and `smem` bytes of dynamic shared memory, cached in `cache` (one
// cache per kernel and configuration, an entry per device); 0 if the query
// fails (the error is cleared: the launch reports real failures).
inline int resident_ctas(const void* kernel, int threads, size_t smem, std::atomic<int> (&cache)[kMaxDevices],
                         int dev) {
  std::atomic<int>& cached = cache[device_slot(dev)];
  int n = cached.load(std::memory_order_relaxed);
  if (n <= 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      return 0;
    }
    cached.store(n, std::memory_order_relaxed);
  }
  return n;
}

// Programmatic dependent launch (sm_90+). A kernel launched this way may
// start while the kernel before it on the stream is still finishing: as soon
// as every CTA of that kernel has exited or executed
// `griddepcontrol.launch_dependents`. It must execute `griddepcontrol.wait`
// (grid_dependency_wait in ptx.cuh) before it reads anything an earlier kernel
// may write or writes anything an earlier kernel may read; what it does before
// (setup) overlaps the previous kernel's tail and this launch's own latency. JAXFP4_PDL=0 in the environment turns it off (an
// ordinary launch), for A/B timing.
inline bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("JAXFP4_PDL");
    return !(e != nullptr && e[0] == '0' && e[1] == '\0');
  }();
  return on;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) as a programmatic
// dependent launch where pdl_enabled() and `programmatic`, an ordinary one
// otherwise. Only for kernels that call grid_dependency_wait() before touching
// inputs or outputs.
template <typename... Params, typename... Args>
cudaError_t launch_dependent_if(bool programmatic, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic && pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             Args&&... args) {
  return launch_dependent_if(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace jaxfp4
