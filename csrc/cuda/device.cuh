// Host-side device queries shared by the CUDA handlers: cached per device so
// that a launch never pays a driver query twice (and never synchronizes).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>

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

}  // namespace jaxfp4
