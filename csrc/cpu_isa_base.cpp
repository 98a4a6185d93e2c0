// CPU kernels compiled for the compiler's baseline instruction set (any x86-64 / ARM).
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>

#define LA_ISA base
#include "cpu_kernels.h"

namespace la {
namespace cpu {
const Kernels kernels_base = {"base", &base::k_dot, &base::k_perturb, &base::k_combine, &base::k_sync,
                              &base::k_nonfinite};
}  // namespace cpu
}  // namespace la
