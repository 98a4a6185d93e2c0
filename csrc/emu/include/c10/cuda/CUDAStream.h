// Emulated build (HIP-CPU): stand-in for c10/cuda/CUDAStream.h. Every launch goes to
// HIP-CPU's null stream.
#pragma once

#include <hip/hip_runtime.h>

#include <c10/core/Device.h>

using cudaStream_t = hipStream_t;

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
