// Emulated build (HIP-CPU): stand-in for c10/cuda/CUDAException.h. HIP-CPU launches are
// asynchronous and the host code between launches (torch ops on CPU tensors) is not
// ordered with them, so the launch check also waits for the launch to finish. It counts
// launches too (emu_launches() in register_emu.cpp: the tests bound launches per op).
#pragma once

#include <hip/hip_runtime.h>

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>

namespace la {
inline std::atomic<int64_t>& emu_launch_count() {
  static std::atomic<int64_t> n{0};
  return n;
}
}  // namespace la

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                        \
  do {                                                                                        \
    ++la::emu_launch_count();                                                                 \
    const hipError_t la_err_ = hipDeviceSynchronize();                                        \
    TORCH_CHECK(la_err_ == hipSuccess, "HIP-CPU launch failed: ", hipGetErrorString(la_err_)); \
  } while (0)
