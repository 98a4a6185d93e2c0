// Multi-tensor launches for the CUDA kernels (the scheme of apex's multi_tensor_apply,
// written for this project): many tensors per launch, described by a table passed as a
// kernel argument. Each CUDA block handles one chunk of kChunk elements of one tensor; a
// table holds up to MaxTensors<DEPTH> tensors (DEPTH pointer lists) and kMaxBlocks
// chunks, sized so that the table plus the op's functor stay under the 4 KB kernel
// argument limit; longer lists are split across launches. Scalars live in the functor
// (host floats) or behind device pointers, so nothing is a template parameter that a new
// lr or step would change.
#pragma once

#include "la_types.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>
#include <vector>

// A kernel launch: <<<>>> under nvcc; the emulated build (csrc/emu/, HIP-CPU on the host)
// defines LA_CUDA_EMU and launches through HIP-CPU. `kernel` is one token (a function
// pointer variable when the kernel is a template with several arguments).
#if defined(LA_CUDA_EMU)
#define LA_LAUNCH(kernel, grid, block, stream, ...) hipLaunchKernelGGL(kernel, grid, block, 0, stream, __VA_ARGS__)
#else
#define LA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

// The launch geometry, overridable at compile time: the emulated tests build a second
// library with tiny chunks and tables so that multi-launch splits happen on small tensors.
#ifndef LA_CUDA_CHUNK
#define LA_CUDA_CHUNK 65536
#endif
#ifndef LA_CUDA_THREADS
#define LA_CUDA_THREADS 512
#endif
#ifndef LA_CUDA_MAX_BLOCKS
#define LA_CUDA_MAX_BLOCKS 320
#endif

namespace la {
namespace cuda {

constexpr int64_t kChunk = LA_CUDA_CHUNK;  // elements per block
constexpr int kThreads = LA_CUDA_THREADS;  // threads per block
constexpr int kMaxBlocks = LA_CUDA_MAX_BLOCKS;
constexpr int kVecBytes = 16;  // one 128-bit access
constexpr int kILP = 8;        // elements per thread per step: one vector of a 16-bit type, two of float
static_assert(kChunk % kILP == 0, "a chunk is a whole number of kILP groups (keeps vectors aligned)");
static_assert(kThreads > 0 && (kThreads & (kThreads - 1)) == 0, "block_sum's tree needs a power of two");
static_assert(kMaxBlocks >= 1, "at least one block per launch");

template <int DEPTH>
struct MaxTensors {
  static constexpr int value = DEPTH <= 1 ? 110 : DEPTH <= 2 ? 64 : DEPTH <= 3 ? 48 : DEPTH <= 4 ? 36
                               : DEPTH <= 5 ? 30 : DEPTH <= 6 ? 24 : 20;
};

template <int DEPTH>
struct Table {
  static constexpr int kT = MaxTensors<DEPTH>::value;
  static_assert(kT <= 255, "block_tensor holds a uint8_t slot");
  void* addr[DEPTH][kT];
  int64_t numel[kT];
  int32_t tensor_id[kT];           // index in the op's full list (per-tensor outputs)
  uint8_t block_tensor[kMaxBlocks];   // table slot of each block's tensor
  int32_t block_chunk[kMaxBlocks];    // chunk index within that tensor
  int64_t block_base;                 // global chunk index of this launch's block 0
};

// Where one block works: tensor slot, element offset and length of its chunk.
struct Loc {
  int slot;
  int64_t start, len;
};

template <int DEPTH>
__device__ __forceinline__ Loc locate(const Table<DEPTH>& tab) {
  Loc l;
  l.slot = tab.block_tensor[blockIdx.x];
  l.start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t rest = tab.numel[l.slot] - l.start;
  l.len = rest < kChunk ? rest : kChunk;
  return l;
}

template <class T, int DEPTH>
__device__ __forceinline__ T* at_chunk(const Table<DEPTH>& tab, int list, const Loc& l) {
  return static_cast<T*>(tab.addr[list][l.slot]) + l.start;
}

// The global chunk index of this block and, for per-tensor reductions, the record of which
// tensor (index in the op's list) it belongs to: chunk_tensor is non-decreasing in the
// chunk index, so a reduction finds each tensor's chunk range on the device (no host table).
template <int DEPTH>
__device__ __forceinline__ int64_t global_chunk(const Table<DEPTH>& tab, int32_t* chunk_tensor, const Loc& l) {
  const int64_t g = tab.block_base + blockIdx.x;
  if (chunk_tensor != nullptr && threadIdx.x == 0) chunk_tensor[g] = tab.tensor_id[l.slot];
  return g;
}

template <int DEPTH, class F>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(Table<DEPTH> tab, F f) {
  f(tab);
}

// Chunk order: tensor by tensor, chunk by chunk, skipping empty tensors. Global chunk g
// of a launch is tab.block_base + blockIdx.x.
inline int64_t total_chunks(const std::vector<int64_t>& numels) {
  int64_t c = 0;
  for (const int64_t n : numels) c += (n + kChunk - 1) / kChunk;
  return c;
}

// lists[d][t]: pointer of tensor t in list d (nullptr for an absent list). A tensor of
// numel 0 is skipped (callers zero the numels of tensors another launch series handles).
template <int DEPTH, class F>
void multi_tensor_apply(const std::vector<std::vector<void*>>& lists, const std::vector<int64_t>& numels,
                        const F& f, cudaStream_t stream) {
  static_assert(sizeof(Table<DEPTH>) + sizeof(F) <= 4000, "kernel arguments exceed the 4 KB limit");
  using Tab = Table<DEPTH>;
  auto* kernel = &multi_tensor_kernel<DEPTH, F>;
  Tab tab;
  tab.block_base = 0;
  int nt = 0, nb = 0;
  int64_t global = 0;
  int last = -1;
  for (size_t t = 0; t < numels.size(); ++t) {
    if (numels[t] > 0) last = static_cast<int>(t);
  }
  for (int t = 0; t <= last; ++t) {
    if (numels[t] == 0) continue;
    for (int d = 0; d < DEPTH; ++d) tab.addr[d][nt] = lists[d].empty() ? nullptr : lists[d][t];
    tab.numel[nt] = numels[t];
    tab.tensor_id[nt] = t;
    ++nt;
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      tab.block_tensor[nb] = static_cast<uint8_t>(nt - 1);
      tab.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool tensor_done = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == Tab::kT && tensor_done) || (t == last && tensor_done)) {
        LA_LAUNCH(kernel, nb, kThreads, stream, tab, f);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        global += nb;
        tab.block_base = global;
        nb = 0;
        if (tensor_done) {
          nt = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          for (int d = 0; d < DEPTH; ++d) tab.addr[d][0] = tab.addr[d][nt - 1];
          tab.numel[0] = tab.numel[nt - 1];
          tab.tensor_id[0] = tab.tensor_id[nt - 1];
          nt = 1;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- vector loads
// Each thread moves kILP consecutive elements per step. Whether a list moves them as
// 16-byte vectors is decided per list (one misaligned list leaves the others vectorized):
// a Ptr carries its pointer and whether it is 16-byte aligned; a group that reaches past
// the chunk's end (the tail of a tensor) goes element by element with bounds checks.
template <class T>
struct Ptr {
  T* p;
  bool vec;  // 16-byte aligned (chunk starts are kILP-element multiples, so every group is)
};

__device__ __forceinline__ bool vec_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

template <class T>
__device__ __forceinline__ Ptr<T> ptr(T* p) {
  return Ptr<T>{p, vec_aligned(p)};
}

template <class T>
struct alignas(kVecBytes) Vec {
  static constexpr int N = kVecBytes / static_cast<int>(sizeof(T));
  T v[N];
};

template <class T>
__device__ __forceinline__ bool whole_vec(const Ptr<T>& s, int64_t i, int64_t len) {
  return s.vec && i + kILP <= len;
}

template <class T>
__device__ __forceinline__ void load(const Ptr<T>& s, int64_t i, int64_t len, float (&out)[kILP]) {
  using U = std::remove_const_t<T>;
  if (whole_vec(s, i, len)) {
    constexpr int N = Vec<U>::N;
    static_assert(kILP % N == 0, "kILP holds whole vectors");
#pragma unroll
    for (int k = 0; k < kILP / N; ++k) {
      const Vec<U> pk = reinterpret_cast<const Vec<U>*>(s.p + i)[k];
#pragma unroll
      for (int j = 0; j < N; ++j) out[k * N + j] = to_f(pk.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) out[j] = i + j < len ? to_f(s.p[i + j]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store(const Ptr<T>& s, int64_t i, int64_t len, const float (&in)[kILP]) {
  if (whole_vec(s, i, len)) {
    constexpr int N = Vec<T>::N;
#pragma unroll
    for (int k = 0; k < kILP / N; ++k) {
      Vec<T> pk;
#pragma unroll
      for (int j = 0; j < N; ++j) pk.v[j] = from_f<T>(in[k * N + j]);
      reinterpret_cast<Vec<T>*>(s.p + i)[k] = pk;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      if (i + j < len) s.p[i + j] = from_f<T>(in[j]);
    }
  }
}

// A list whose dtype is a run-time value (la_types.h's dtype_code: 0 float32, 1 bfloat16, 2
// float16): one kernel serves every dtype combination of an op instead of one instantiation
// per combination (the branch is uniform over the grid). Lists that are always float32
// (masters, optimizer state, v, slow weights) stay typed (Ptr<float>).
struct AnyPtr {
  void* p;
  int code;
  bool vec;
};

template <int DEPTH>
__device__ __forceinline__ AnyPtr any_at(const Table<DEPTH>& tab, int list, const Loc& l, int code) {
  char* base = static_cast<char*>(tab.addr[list][l.slot]);
  void* p = base ? base + l.start * (code == 0 ? 4 : 2) : nullptr;
  return AnyPtr{p, code, vec_aligned(p)};
}

__device__ __forceinline__ void load(const AnyPtr& s, int64_t i, int64_t len, float (&out)[kILP]) {
  if (s.code == 1) load(Ptr<const bf16>{static_cast<const bf16*>(s.p), s.vec}, i, len, out);
  else if (s.code == 2) load(Ptr<const f16>{static_cast<const f16*>(s.p), s.vec}, i, len, out);
  else load(Ptr<const float>{static_cast<const float*>(s.p), s.vec}, i, len, out);
}

__device__ __forceinline__ void store(const AnyPtr& s, int64_t i, int64_t len, const float (&in)[kILP]) {
  if (s.code == 1) store(Ptr<bf16>{static_cast<bf16*>(s.p), s.vec}, i, len, in);
  else if (s.code == 2) store(Ptr<f16>{static_cast<f16*>(s.p), s.vec}, i, len, in);
  else store(Ptr<float>{static_cast<float*>(s.p), s.vec}, i, len, in);
}

// The value a float becomes when stored in dtype `code` and read back.
__device__ __forceinline__ float stored(int code, float x) {
  return code == 1 ? to_f(from_f<bf16>(x)) : code == 2 ? to_f(from_f<f16>(x)) : x;
}

// Runs body.step(i) for i = 0, kILP, 2 kILP, ... < len over the block's threads.
template <class Body>
__device__ __forceinline__ void for_ilp(int64_t len, const Body& body) {
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kILP; i < len; i += static_cast<int64_t>(blockDim.x) * kILP)
    body.step(i);
}

}  // namespace cuda
}  // namespace la
