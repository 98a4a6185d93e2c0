// Emulated build (HIP-CPU): stand-in for c10/cuda/CUDAException.h. HIP-CPU launches are
// asynchronous and the host code between launches (torch ops on CPU tensors) is not
// ordered with them, so the launch check also waits for the launch to finish.
#pragma once

#include <hip/hip_runtime.h>

#include <c10/util/Exception.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                      \
  do {                                                                                      \
    const hipError_t la_err_ = hipDeviceSynchronize();                                      \
    TORCH_CHECK(la_err_ == hipSuccess, "HIP-CPU launch failed: ", hipGetErrorString(la_err_)); \
  } while (0)
