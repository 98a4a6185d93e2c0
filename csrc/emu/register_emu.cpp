// The emulated CUDA build: csrc/ops_cuda.cu compiled by g++ against AMD's HIP-CPU runtime
// (kernels run on the host: blocks in parallel through TBB, a block's threads as fibers) and
// registered for CPU tensors under the op namespace LA_EMU_NS (torch.ops.lookahead_ext_emu by
// default; the small-chunk test build uses another). Built by scripts/build_cuda_emu.py with
// include/ (stand-ins for c10/cuda) first on the include path. Tests: tests/test_cuda_emu.py.
// hip/hip_runtime.h defines __HIPCC__, which would make torch's headers expect a GPU
// compiler: torch first (ops_cuda.cu's own includes), HIP-CPU after (the stand-ins).
#include <ATen/ATen.h>
#include <torch/library.h>

#define LA_CUDA_EMU 1
#define LA_CUDA_DEVICE_OK(dev) (dev).is_cpu()

#include "../ops_cuda.cu"
#include "../schemas.h"

#ifndef LA_EMU_NS
#define LA_EMU_NS lookahead_ext_emu
#endif

namespace {
// The launch geometry this library was built with, for the tests' stress sizes:
// [kChunk, kThreads, kMaxBlocks, kILP, table capacity at depth 1, 2, 3, 4, 8].
std::vector<int64_t> emu_config() {
  using namespace la::cuda;
  return {kChunk, kThreads, kMaxBlocks, kILP, MaxTensors<1>::value, MaxTensors<2>::value, MaxTensors<3>::value,
          MaxTensors<4>::value, MaxTensors<8>::value};
}

// Kernel launches made by this library so far.
int64_t emu_launches() { return la::emu_launch_count().load(); }
}  // namespace

// one level of indirection so that LA_EMU_NS expands before TORCH_LIBRARY pastes it
#define LA_EMU_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LA_EMU_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

LA_EMU_LIBRARY(LA_EMU_NS, m) {
  la::define_schemas(m);
  m.def("emu_config() -> int[]", &emu_config);
  m.def("emu_launches() -> int", &emu_launches);
}

LA_EMU_LIBRARY_IMPL(LA_EMU_NS, m) { la::cuda::register_ops(m); }
