// Interface between the torch glue (ops_cpu.cpp) and the CPU kernels, which are compiled
// once per instruction set (cpu_isa_base.cpp: the compiler's baseline; cpu_isa_avx2.cpp:
// AVX2+FMA+F16C) and chosen at run time, as ATen does for its own CPU kernels. Everything
// here is raw pointers and PODs: no torch header enters the ISA translation units.
#pragma once

#include <cstdint>

#include "la_math.h"

namespace la {
namespace cpu {

// dtype codes of la_types.h: 0 float32, 1 bfloat16, 2 float16
struct Chunk {
  int64_t t, b, e;  // tensor index and element range [b, e) of one work item
};

struct Work {
  const Chunk* chunks;
  int64_t n_chunks;
  int threads;  // OpenMP threads (1: serial)
  bool nt;      // streaming stores for write-only outputs (large calls; ISA TUs that have them)
};

// All pairs of one multi_dot call in one pass: each chunk is walked block by block (kDotBlock
// elements, L1-resident) and every pair is reduced over the block before the next block is
// loaded, so each input list is read from memory once however many pairs use it.
struct DotArgs {
  Work w;
  const void* const* const* lists;  // lists[l][t]: data of tensor t of list l
  const int* types;                  // dtype code per list
  const int* pairs;                  // 2 * n_pairs list indices
  int n_pairs;
  double* slot;  // slot[p * n_chunks + c]: one partial per (pair, chunk) (fixed -> deterministic)
};

struct PerturbArgs {
  Work w;
  void* const* out;
  void* const* base;
  const void* const* dir;
  void* const* backup;  // nullptr: none (same dtype as base)
  int to, tb, td;
  float scale;
};

struct CombineArgs {
  Work w;
  void* const* params;
  float* const* masters;
  const void* const* g0;
  const void* const* gp;
  const void* const* gm;
  float* const* s1;  // SGD momentum buffer / AdamW exp_avg (nullptr: none)
  float* const* s2;  // AdamW exp_avg_sq
  float* const* v;   // nullptr: no v update
  double* vsq_slot;  // nullptr, or one partial of sum v_new^2 per chunk (multi_dot's blocks)
  int tp, tg;
  bool adam;
  bool write_masters;  // false: masters are only read, the new w goes to params only
  Combine k;
  Sgd sgd;
  AdamW adamw;
  float vc[4];  // bv, a0, a+, a-
};

struct SyncArgs {
  Work w;
  float* const* slow;
  void* const* fast;
  void* const* params;  // nullptr: none
  int tf, tq;
  float alpha;
};

struct NonfiniteArgs {
  Work w;
  void* const* x;
  const int* types;  // dtype code per tensor
  uint8_t* bad;      // one flag per chunk
  double* sq_slot;   // nullptr, or one partial of sum x^2 per chunk (multi_dot's blocks)
  bool unscale;
  float inv_scale;
};

struct Kernels {
  const char* isa;
  void (*dot)(const DotArgs&);
  void (*perturb)(const PerturbArgs&);
  void (*combine)(const CombineArgs&);
  void (*sync)(const SyncArgs&);
  void (*nonfinite)(const NonfiniteArgs&);
};

extern const Kernels kernels_base;
extern const Kernels kernels_avx2;  // isa == nullptr where it is not built
bool avx2_supported();

}  // namespace cpu
}  // namespace la
