// The benchmark's read-only floor (shared benchmark-protocol.md): a kernel
// that only streams a byte buffer (the weight bytes) through the SMs, with
// 16-byte loads, a persistent grid sized to the multiprocessors and several
// loads in flight per thread. Target `jaxfp4_bench_stream_read`:
//   x U8 [any shape] -> out F32 [R] (R >= 1; any shape with R elements);
//   attribute early (int32): 0 (the protocol's floor): a launch waits for the
//   kernel before it (griddepcontrol.wait) before its first load, as the packed
//   GEMM's copies do, so every launch pays its own ramp-up and tail, the "fixed
//   ramp-up and tail of a few microseconds per launch" the protocol's floor
//   figures include; 1: it streams before that wait, overlapping the previous
//   launch's tail (back-to-back calls then run at the copy bandwidth; a GEMM can
//   do that only with weights it knows no kernel before it writes).
// The kernel runs R times back to back, launch i writing out[i]: with R > 1
// one custom call is a chain of launches, which shows whether launches inside
// one call overlap (programmatic dependent launch) where separate calls do not.
// The loads are volatile asm (the compiler may not drop or merge them) and
// their XOR is reduced per block; block 0 writes out[0] from its own sum, so
// the result never depends on what the output held before (no atomics, no
// zero-initialisation). The value is a checksum of part of the buffer, nothing
// more: the kernel exists to be timed.
//
// Target `jaxfp4_bench_clock`: any operands (dependencies only, never read) ->
// out U32 [2], the GPU's %globaltimer in ns (low word, high word) when the
// stream reaches the call. Two of them around a jitted function's work time it
// on the device, whatever the host's dispatch costs: where a call's host
// dispatch is about as long as its GPU time (R small GEMMs, each with several
// operands), host-timed executions measure the host (benchmarks/gemm.py).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "jaxfp4/registry.h"
#include "device.cuh"
#include "ptx.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxfp4 {
namespace {

constexpr int kThreads = 512;
constexpr int kBlocksPerSm = 2;  // 1024 threads per SM, 8 x 16 B in flight each
constexpr int kUnroll = 8;

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  // Non-coherent, no L1 allocation: every byte comes from L2/DRAM exactly once.
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__global__ void __launch_bounds__(kThreads) stream_read_kernel(const uint8_t* __restrict__ x, int64_t n,
                                                                float* __restrict__ out, int early) {
  // Launched like the packed GEMM (a programmatic dependent launch, device.cuh):
  // the next launch may start its set-up while this one runs. early: the loads
  // do not wait for the previous kernel (so the checksum may see bytes it is
  // still writing; the value means nothing anyway).
  allow_dependent_launch();
  if (!early) grid_dependency_wait();
  const int64_t n16 = n / 16;
  const uint4* v = reinterpret_cast<const uint4*>(x);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t acc = 0;
  for (; i + (kUnroll - 1) * stride < n16; i += kUnroll * stride) {
    uint4 r[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) r[j] = load_stream(v + i + j * stride);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) acc ^= r[j].x ^ r[j].y ^ r[j].z ^ r[j].w;
  }
  for (; i < n16; i += stride) {
    const uint4 r = load_stream(v + i);
    acc ^= r.x ^ r.y ^ r.z ^ r.w;
  }
  if (blockIdx.x == 0) {
    // The tail bytes (n % 16) and the block's own reduction.
    for (int64_t t = n16 * 16 + threadIdx.x; t < n; t += blockDim.x) acc ^= x[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    grid_dependency_wait();  // out may be what the previous kernel reads
    __shared__ uint32_t warp_acc[kThreads / 32];
    if ((threadIdx.x & 31) == 0) warp_acc[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t a = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) a ^= warp_acc[w];
      out[0] = static_cast<float>(a & 0xFFFFFFu);  // a finite number
    }
  }
}

ffi::Error BenchStreamReadImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out, int32_t early) {
  if (x.element_type() != ffi::DataType::U8) {
    return ffi::Error::InvalidArgument("jaxfp4_bench_stream_read: x must be U8");
  }
  if (out->element_type() != ffi::DataType::F32 || out->element_count() < 1) {
    return ffi::Error::InvalidArgument("jaxfp4_bench_stream_read: out must be F32 with at least one element");
  }
  if (reinterpret_cast<uintptr_t>(x.untyped_data()) % 16 != 0) {
    return ffi::Error::InvalidArgument("jaxfp4_bench_stream_read: x must be 16-byte aligned");
  }
  const int64_t n = static_cast<int64_t>(x.element_count());
  const int64_t n16 = n / 16;
  const int64_t cap = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  int64_t blocks = (n16 + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > cap ? cap : blocks);
  cudaError_t err = cudaSuccess;
  for (int64_t i = 0; i < static_cast<int64_t>(out->element_count()) && err == cudaSuccess; ++i) {
    err = launch_dependent(stream_read_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream,
                           static_cast<const uint8_t*>(x.untyped_data()), n,
                           static_cast<float*>(out->untyped_data()) + i, static_cast<int>(early != 0));
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxfp4_bench_stream_read launch: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

__global__ void clock_kernel(uint32_t* out) {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  out[0] = static_cast<uint32_t>(t);
  out[1] = static_cast<uint32_t>(t >> 32);
}

ffi::Error BenchClockImpl(cudaStream_t stream, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> out) {
  if (out->element_type() != ffi::DataType::U32 || out->element_count() != 2) {
    return ffi::Error::InvalidArgument("jaxfp4_bench_clock: out must be U32 with 2 elements");
  }
  // An ordinary launch: it starts after everything before it on the stream.
  clock_kernel<<<1, 1, 0, stream>>>(static_cast<uint32_t*>(out->untyped_data()));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxfp4_bench_clock launch: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxfp4

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4BenchStreamReadCuda, jaxfp4::BenchStreamReadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()   // x U8 (the weight bytes)
                                  .Ret<ffi::AnyBuffer>()   // out F32 [R]: R launches
                                  .Attr<int32_t>("early"),  // 1: loads before griddepcontrol.wait
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFp4BenchClockCuda, jaxfp4::BenchClockImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .RemainingArgs()         // dependencies (not read)
                                  .Ret<ffi::AnyBuffer>(),  // out U32 [2]: %globaltimer, ns
                              {ffi::Traits::kCmdBufferCompatible});
