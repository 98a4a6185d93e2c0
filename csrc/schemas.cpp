// The torch op schemas of lookahead_ext (namespace torch.ops.lookahead_ext) and the Python
// module `lookahead_ext._C` that registers them on import. CPU kernels: ops_cpu.cpp;
// schemas: schemas.h; CUDA kernels: ops_cuda.cu (module lookahead_ext._C_cuda). Python wrappers with the
// reference signatures: lookahead_ext/ops/native.py. The Python module: pymodule.cpp.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(lookahead_ext, m) { la::define_schemas(m); }
