// CUDA kernels of the five ops (schemas in schemas.h, element-wise math in la_math.h,
// shared with the CPU kernels). Every op is one multi-tensor launch per up to kMaxBlocks
// chunks (multi_tensor.cuh). Reductions write one float partial per chunk (fixed slots, no
// float atomics) and the tensor of each chunk; two cleanup kernels find each tensor's chunks
// on the device and sum them in a fixed order, so results are bitwise reproducible run to
// run and no host buffer is read by a launch (CUDA-graph safe). nonfinite_'s sq_norms are
// summed in its checking pass; combine_step_'s v_sq_out is multi_dot on the updated v
// (one extra read pass), added on the device. Device scalars (perturb scale, v coefficients,
// AMP inv_scale) are read in-kernel through pointers: no host sync; a CPU scale or v
// coefficient is read on the host once, as torch._foreach_* read CPU scalars. The emulated
// build (csrc/emu/) compiles this file with g++ against HIP-CPU and runs it on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "la_math.h"
#include "multi_tensor.cuh"
#include "op_args.h"

namespace la {
namespace cuda {
namespace {

// ------------------------------------------------------------------ reductions
template <class T>
__device__ __forceinline__ T block_sum(T v) {  // fixed tree: deterministic for a given blockDim
  __shared__ T buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

// First index of a non-decreasing array a[0, n) with a[k] >= x.
__device__ __forceinline__ int64_t lower_bound(const int32_t* a, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// per[p][t] = sum of tensor t's chunk partials, in chunk order (then a fixed tree). Tensor
// t's chunks are found in chunk_tensor (written by the element kernel); a tensor without
// chunks here (empty, or handled by another launch series) keeps its value (zeros).
__global__ void dot_per_tensor(const float* partial, int64_t C, const int32_t* chunk_tensor, int64_t n, double* per) {
  const int64_t t = blockIdx.x, p = blockIdx.y;
  const int64_t lo = lower_bound(chunk_tensor, C, t), hi = lower_bound(chunk_tensor, C, t + 1);
  if (lo == hi) return;  // uniform over the block: no thread reaches block_sum's barriers
  double s = 0.0;
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) s += partial[p * C + c];
  s = block_sum(s);
  if (threadIdx.x == 0) per[p * n + t] = s;
}

// Contiguous segments of per-tensor sums, passed by value (kernel arguments: no host
// buffer a graph replay could read stale): segment k is [bound[k], bound[k+1]).
constexpr int kMaxSegments = 64;
struct Segments {
  int64_t bound[kMaxSegments + 1];
};

// out_sum[k] = sum of per over segment k (double, fixed order); out_per (when given) gets
// each per-tensor sum as float.
__global__ void segment_sums(const double* per, Segments seg, float* out_sum, float* out_per) {
  const int k = blockIdx.x;
  double s = 0.0;
  for (int64_t t = seg.bound[k] + threadIdx.x; t < seg.bound[k + 1]; t += blockDim.x) {
    s += per[t];
    if (out_per) out_per[t] = static_cast<float>(per[t]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) out_sum[k] = static_cast<float>(s);
}

// Launches segment_sums over bounds[0..nseg] (nseg + 1 offsets into per), kMaxSegments per launch.
void sum_segments(const double* per, const std::vector<int64_t>& bounds, float* out_sum, float* out_per,
                  cudaStream_t stream) {
  auto* kernel = &segment_sums;
  const int64_t nseg = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t k0 = 0; k0 < nseg; k0 += kMaxSegments) {
    const int64_t m = std::min<int64_t>(kMaxSegments, nseg - k0);
    Segments seg{};
    for (int64_t k = 0; k <= m; ++k) seg.bound[k] = bounds[k0 + k];
    LA_LAUNCH(kernel, static_cast<unsigned>(m), kThreads, stream, per, seg, out_sum + k0, out_per);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Per-tensor sums of chunk partials: one launch, grid (n tensors, P rows).
void per_tensor_sums(const float* partial, int64_t C, const int32_t* chunk_tensor, int64_t n, int64_t P, double* per,
                     cudaStream_t stream) {
  auto* kernel = &dot_per_tensor;
  LA_LAUNCH(kernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>(P)), kThreads, stream, partial, C,
            chunk_tensor, n, per);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------ multi_dot
struct DotBody {
  AnyPtr a, b;
  int64_t len;
  float* acc;
  __device__ __forceinline__ void step(int64_t i) const {
    float x[kILP], y[kILP];
    load(a, i, len, x);
    load(b, i, len, y);
#pragma unroll
    for (int j = 0; j < kILP; ++j) *acc += x[j] * y[j];
  }
};

struct DotFn {
  float* partial;         // one slot per global chunk
  int32_t* chunk_tensor;  // the tensor of each global chunk (nullptr: already recorded)
  int ca, cb;             // dtype codes of the two lists
  __device__ void operator()(const Table<2>& tab) const {
    const Loc l = locate(tab);
    const int64_t g = global_chunk(tab, chunk_tensor, l);
    float acc = 0.0f;
    for_ilp(l.len, DotBody{any_at(tab, 0, l, ca), any_at(tab, 1, l, cb), l.len, &acc});
    const float s = block_sum(acc);
    if (threadIdx.x == 0) partial[g] = s;
  }
};

template <class T>
std::vector<void*> ptrs(at::TensorList ts) {
  std::vector<void*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr());
  return out;
}

// The device of an op whose first list may be empty: the first tensor of any list (the CPU
// ops validate every list even when the first is empty; so do these, on that device).
inline c10::optional<at::Device> first_device(std::initializer_list<at::TensorList> lists) {
  for (const auto& l : lists) {
    if (!l.empty()) return l[0].device();
  }
  return c10::nullopt;
}

// The device these kernels run on: CUDA, or the CPU in the emulated build (csrc/emu/).
#ifndef LA_CUDA_DEVICE_OK
#define LA_CUDA_DEVICE_OK(dev) (dev).is_cuda()
#endif

// The dispatcher picks these CUDA kernels when *any* tensor argument is on CUDA, so the
// op's device (its first tensor's) may be the CPU: CUDAGuard would then fail an internal
// assert; raise the device error that check_list gives instead.
inline void check_cuda(const at::Device& dev, const char* op) {
  TORCH_CHECK(LA_CUDA_DEVICE_OK(dev), op, ": the first tensor is on ", dev,
              " but the op runs on CUDA (all tensors must share one device)");
}

// A one-element scalar tensor on the host while the op runs on a device: read once here
// and used as a host float (torch._foreach_* accept CPU scalars with CUDA lists too).
inline bool host_scalar(const at::Tensor& t, const at::Device& dev) { return t.device() != dev; }

// la_types.h's dtype_code of a (validated: fp32 / bf16 / fp16) tensor list.
inline int code(at::TensorList ts) {
  const at::ScalarType t = ts[0].scalar_type();
  return t == at::kBFloat16 ? 1 : t == at::kHalf ? 2 : 0;
}

at::Tensor multi_dot_cuda(at::TensorList tensors, int64_t n_lists, at::IntArrayRef pairs, bool per_tensor) {
  TORCH_CHECK(!tensors.empty(), "multi_dot: no tensors");
  const at::Device dev = tensors[0].device();
  check_cuda(dev, "multi_dot");
  c10::cuda::CUDAGuard guard(dev);
  std::vector<int64_t> numels;
  const auto lists = dot_lists(tensors, n_lists, pairs, dev, numels);
  const int64_t n = static_cast<int64_t>(tensors.size()) / n_lists;
  const int64_t P = static_cast<int64_t>(pairs.size()) / 2;
  const int64_t C = total_chunks(numels);
  auto fopt = at::TensorOptions().dtype(at::kFloat).device(dev);
  auto out_per = at::zeros({P, n}, fopt);
  auto out_sum = at::zeros({P}, fopt);
  if (C == 0 || P == 0) return per_tensor ? out_per : out_sum;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  auto partial = at::empty({P, C}, fopt);
  auto chunk_tensor = at::empty({C}, at::TensorOptions().dtype(at::kInt).device(dev));
  for (int64_t p = 0; p < P; ++p) {
    at::TensorList a = lists[pairs[2 * p]], b = lists[pairs[2 * p + 1]];
    // every pair has the same chunks: the first records their tensors
    DotFn f{partial.data_ptr<float>() + p * C, p == 0 ? chunk_tensor.data_ptr<int32_t>() : nullptr, code(a), code(b)};
    multi_tensor_apply<2>({ptrs<void>(a), ptrs<void>(b)}, numels, f, stream);
  }
  auto per = at::zeros({P, n}, at::TensorOptions().dtype(at::kDouble).device(dev));
  per_tensor_sums(partial.data_ptr<float>(), C, chunk_tensor.data_ptr<int32_t>(), n, P, per.data_ptr<double>(), stream);
  std::vector<int64_t> rows(P + 1);  // segment p: row p of per
  for (int64_t p = 0; p <= P; ++p) rows[p] = p * n;
  sum_segments(per.data_ptr<double>(), rows, out_sum.data_ptr<float>(), out_per.data_ptr<float>(), stream);
  return per_tensor ? out_per : out_sum;
}

// ------------------------------------------------------------------ perturb_
struct PerturbBody {
  AnyPtr o, b, d;
  AnyPtr k;  // backup, base's dtype (p == nullptr: none)
  float s;
  int64_t len;
  __device__ __forceinline__ void step(int64_t i) const {
    float x[kILP], y[kILP], r[kILP];
    load(b, i, len, x);
    load(d, i, len, y);
    if (k.p) store(k, i, len, x);  // exact: x is the float value of a B
#pragma unroll
    for (int j = 0; j < kILP; ++j) r[j] = perturb(x[j], y[j], s);
    store(o, i, len, r);
  }
};

struct PerturbFn {
  const float* scale_t;  // device scalar or nullptr
  float scale_f;
  int co, cb, cd;  // dtype codes of out, base (and backup), direction
  __device__ void operator()(const Table<4>& tab) const {
    const Loc l = locate(tab);
    const float s = (scale_t ? *scale_t : 1.0f) * scale_f;
    for_ilp(l.len, PerturbBody{any_at(tab, 0, l, co), any_at(tab, 1, l, cb), any_at(tab, 2, l, cd),
                               any_at(tab, 3, l, cb), s, l.len});
  }
};

void perturb_cuda(at::TensorList out, at::TensorList base, at::TensorList direction,
                  const c10::optional<at::Tensor>& scale_t, double scale_f, at::TensorList backup) {
  // empty out: the other lists are still validated (ops_cpu.cpp does), then nothing to do
  const auto d0 = first_device({out, base, direction, backup});
  if (!d0) return;
  const at::Device dev = *d0;
  check_cuda(dev, "perturb_");
  c10::cuda::CUDAGuard guard(dev);
  std::vector<int64_t> numels;
  check_list(out, "perturb_", "out", dev, numels);
  check_list(base, "perturb_", "base", dev, numels);
  check_list(direction, "perturb_", "direction", dev, numels);
  if (!backup.empty() && !base.empty()) check_list(backup, "perturb_", "backup", dev, numels, base[0].scalar_type());
  check_scalar(scale_t, "perturb_", "scale", dev, /*host_ok=*/true);
  if (out.empty()) return;
  check_out_base(out, base);  // as on the CPU: out may be base only with base's dtype
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  float sf = static_cast<float>(scale_f);
  const float* sp = nullptr;
  if (scale_t && host_scalar(*scale_t, dev)) sf = static_cast<float>(scale_t->item<float>() * scale_f);
  else if (scale_t) sp = scale_t->data_ptr<float>();
  std::vector<std::vector<void*>> lists = {ptrs<void>(out), ptrs<void>(base), ptrs<void>(direction),
                                           backup.empty() ? std::vector<void*>() : ptrs<void>(backup)};
  // every (out, base, direction) dtype triple, as on the CPU
  multi_tensor_apply<4>(lists, numels, PerturbFn{sp, sf, code(out), code(base), code(direction)}, stream);
}

// ------------------------------------------------------------------ combine_step_
struct CombineScalars {
  Combine k;
  Sgd sgd;
  AdamW adamw;
  float vc_f[4];
  const float* vc_t[4];  // device scalars (nullptr: the host float vc_f)
  const double* base_t;  // the base step's scalars on the device (op_args.h; nullptr: sgd / adamw above)
  const float* skip;     // skip_if (nullptr: none): nonzero restores params from masters, nothing else
  bool r0, rp, rm, has_s1, has_v;
  bool write_w;  // false: masters are only read (write_masters=false), the new w goes to params
};

// A skipped step: params <- cast(masters), the restore of a probe point (masters, state and v
// are neither read nor written).
struct RestoreBody {
  AnyPtr p;
  Ptr<float> w;
  int64_t len;
  __device__ __forceinline__ void step(int64_t i) const {
    float wv[kILP];
    load(w, i, len, wv);
    store(p, i, len, wv);
  }
};

// skip_if is set (a device flag: one load per block, uniform over the block)
__device__ __forceinline__ bool skipped(const float* skip) { return skip != nullptr && *skip != 0.0f; }

template <bool ADAM>
struct CombineBody {
  AnyPtr p;
  Ptr<float> w;
  AnyPtr g0, gp, gm;
  Ptr<float> s1, s2, v;
  CombineScalars c;  // by value: registers, not a pointer into kernel-parameter space
  float vc[4];
  int64_t len;
  __device__ __forceinline__ void step(int64_t i) const {
    float wv[kILP], f0[kILP] = {0}, fp[kILP] = {0}, fm[kILP] = {0}, b1[kILP] = {0}, b2[kILP] = {0}, vv[kILP];
    load(w, i, len, wv);
    if (c.r0) load(g0, i, len, f0);
    if (c.rp) load(gp, i, len, fp);
    if (c.rm) load(gm, i, len, fm);
    if (c.has_s1) load(s1, i, len, b1);
    if (ADAM) load(s2, i, len, b2);
    if (c.has_v) load(v, i, len, vv);
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      const float d = direction(c.k, f0[j], fp[j], fm[j]);
      if (c.has_v) vv[j] = momentum_v(c.k, vv[j], f0[j], fp[j], fm[j], vc[0], vc[1], vc[2], vc[3]);
      wv[j] = ADAM ? adamw(c.adamw, wv[j], d, &b1[j], &b2[j]) : sgd(c.sgd, wv[j], d, &b1[j]);
    }
    if (c.write_w) store(w, i, len, wv);
    store(p, i, len, wv);
    if (c.has_s1) store(s1, i, len, b1);
    if (ADAM) store(s2, i, len, b2);
    if (c.has_v) store(v, i, len, vv);
  }
};

template <bool ADAM>
struct CombineFn {
  CombineScalars cs;
  int cp, cg;  // dtype codes of params and grads
  __device__ void operator()(const Table<8>& tab) const {
    const Loc l = locate(tab);
    CombineBody<ADAM> b;
    b.p = any_at(tab, 0, l, cp);
    b.w = ptr(at_chunk<float>(tab, 1, l));
    if (skipped(cs.skip)) {
      if (b.p.p != static_cast<void*>(b.w.p)) for_ilp(l.len, RestoreBody{b.p, b.w, l.len});
      return;
    }
    b.g0 = any_at(tab, 2, l, cg);  // an absent list (flag off) has a null pointer and is not read
    b.gp = any_at(tab, 3, l, cg);
    b.gm = any_at(tab, 4, l, cg);
    b.s1 = ptr(cs.has_s1 ? at_chunk<float>(tab, 5, l) : nullptr);
    b.s2 = ptr(ADAM ? at_chunk<float>(tab, 6, l) : nullptr);
    b.v = ptr(cs.has_v ? at_chunk<float>(tab, 7, l) : nullptr);
    b.c = cs;
    if (cs.base_t) {  // the device scalars, decoded as the host ones (la_math.h)
      if (ADAM) b.c.adamw = adamw_from(cs.base_t);
      else b.c.sgd = sgd_from(cs.base_t, cs.sgd.nesterov, cs.base_t[5] != 0.0, cs.sgd.use_momentum);
    }
    for (int j = 0; j < 4; ++j) b.vc[j] = cs.vc_t[j] ? *cs.vc_t[j] : cs.vc_f[j];
    b.len = l.len;
    for_ilp(l.len, b);
  }
};

// v_sq_out += sum, unless skip_if is set (one thread; the add of torch's add_)
__global__ void add_unless_skipped(float* acc, const float* sum, const float* skip) {
  if (!skipped(skip)) *acc = *acc + *sum;
}

void combine_step_cuda(at::TensorList params, at::TensorList masters, at::TensorList g0, at::TensorList gp,
                       at::TensorList gm, at::ArrayRef<double> coefs, at::TensorList state1,
                       at::TensorList state2, at::TensorList v, const OptTensors& v_coefs_t,
                       at::ArrayRef<double> v_coefs_f, int64_t kind, at::ArrayRef<double> hyper,
                       at::IntArrayRef flags, const c10::optional<at::Tensor>& v_sq_out, bool write_masters,
                       const c10::optional<at::Tensor>& base_t, const c10::optional<at::Tensor>& skip_if) {
  const char* op = "combine_step_";
  // empty params: the other lists are still validated (ops_cpu.cpp does), then nothing to do
  auto d0 = first_device({params, masters, g0, gp, gm, state1, state2, v});
  if (!d0 && v_sq_out) d0 = v_sq_out->device();
  if (!d0) return;
  const at::Device dev = *d0;
  check_cuda(dev, op);
  c10::cuda::CUDAGuard guard(dev);
  const CombineLists chk = check_combine_args(op, params, masters, g0, gp, gm, state1, state2, v, v_coefs_t,
                                              v_coefs_f, kind, v_sq_out, write_masters, base_t, skip_if, dev,
                                              /*host_scalars_ok=*/true);
  if (params.empty()) return;
  const std::vector<int64_t>& numels = chk.numels;
  const at::ScalarType gdt = chk.gdt;
  CombineScalars cs{};
  cs.k = make_combine(coefs, flags, !g0.empty(), !gp.empty(), !gm.empty(), !v.empty());
  const bool adam = kind == kAdamW;
  if (adam) cs.adamw = make_adamw(hyper);
  else cs.sgd = make_sgd(hyper, flags, !state1.empty());
  cs.r0 = cs.k.u0 || cs.k.w0;
  cs.rp = cs.k.up || cs.k.wp;
  cs.rm = cs.k.um || cs.k.wm;
  cs.has_s1 = adam || cs.sgd.use_momentum;
  cs.has_v = !v.empty();
  cs.write_w = write_masters;
  cs.base_t = base_t ? base_t->data_ptr<double>() : nullptr;
  cs.skip = skip_if ? skip_if->data_ptr<float>() : nullptr;
  for (int i = 0; i < 4; ++i) {
    const float* t = cs.has_v ? vcoef_ptr(v_coefs_t, static_cast<size_t>(i)) : nullptr;
    cs.vc_f[i] = cs.has_v ? static_cast<float>(v_coefs_f[i]) : 0.0f;
    const c10::optional<at::Tensor> x = t ? v_coefs_t.get(i) : c10::nullopt;
    if (x && host_scalar(*x, dev)) {
      cs.vc_f[i] = x->item<float>();
      t = nullptr;
    }
    cs.vc_t[i] = t;
  }
  auto opt = [](at::TensorList l) { return l.empty() ? std::vector<void*>() : ptrs<void>(l); };
  std::vector<std::vector<void*>> lists = {ptrs<void>(params), ptrs<void>(masters), opt(g0), opt(gp), opt(gm),
                                           cs.has_s1 ? opt(state1) : std::vector<void*>(),
                                           adam ? opt(state2) : std::vector<void*>(), opt(v)};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  // every (params, grads) dtype pair, as on the CPU
  const int cp = code(params), cg = gdt == at::kBFloat16 ? 1 : gdt == at::kHalf ? 2 : 0;
  if (adam) multi_tensor_apply<8>(lists, numels, CombineFn<true>{cs, cp, cg}, stream);
  else multi_tensor_apply<8>(lists, numels, CombineFn<false>{cs, cp, cg}, stream);
  if (v_sq_out && !v.empty()) {  // sum v_new^2: multi_dot's kernels on the stored v, added on device
    const std::vector<int64_t> pair = {0, 0};
    const at::Tensor sum = multi_dot_cuda(v, 1, pair, false);
    auto* kernel = &add_unless_skipped;
    LA_LAUNCH(kernel, 1, 1, stream, v_sq_out->data_ptr<float>(), sum.data_ptr<float>(), cs.skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ------------------------------------------------------------------ lookahead_sync_
struct SyncBody {
  Ptr<float> s;
  AnyPtr f;
  AnyPtr q;  // params (p == nullptr: none)
  float alpha;
  int64_t len;
  __device__ __forceinline__ void step(int64_t i) const {
    float x[kILP], y[kILP];
    load(s, i, len, x);
    load(f, i, len, y);
#pragma unroll
    for (int j = 0; j < kILP; ++j) x[j] = lookahead(x[j], y[j], alpha);
    store(s, i, len, x);
    store(f, i, len, x);
    if (q.p) store(q, i, len, x);
  }
};

struct SyncFn {
  float alpha;
  int cf, cq;         // dtype codes of fast and params
  const float* skip;  // skip_if (nullptr: none): nonzero writes nothing
  __device__ void operator()(const Table<3>& tab) const {
    if (skipped(skip)) return;
    const Loc l = locate(tab);
    for_ilp(l.len, SyncBody{ptr(at_chunk<float>(tab, 0, l)), any_at(tab, 1, l, cf), any_at(tab, 2, l, cq), alpha, l.len});
  }
};

void lookahead_sync_cuda(at::TensorList slow, at::TensorList fast, double alpha, at::TensorList params,
                         const c10::optional<at::Tensor>& skip_if) {
  // empty slow: the other lists are still validated (ops_cpu.cpp does), then nothing to do
  const auto d0 = first_device({slow, fast, params});
  if (!d0) return;
  const at::Device dev = *d0;
  check_cuda(dev, "lookahead_sync_");
  c10::cuda::CUDAGuard guard(dev);
  std::vector<int64_t> numels;
  check_list(slow, "lookahead_sync_", "slow", dev, numels, at::kFloat);
  check_list(fast, "lookahead_sync_", "fast", dev, numels);
  if (!params.empty()) check_list(params, "lookahead_sync_", "params", dev, numels);
  check_skip_if("lookahead_sync_", skip_if, dev);
  if (slow.empty()) return;
  check_distinct("lookahead_sync_", 3, {{"slow", slow}, {"fast", fast}, {"params", params}});  // as on the CPU
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  std::vector<std::vector<void*>> lists = {ptrs<void>(slow), ptrs<void>(fast),
                                           params.empty() ? std::vector<void*>() : ptrs<void>(params)};
  multi_tensor_apply<3>(lists, numels, SyncFn{static_cast<float>(alpha), code(fast), params.empty() ? 0 : code(params),
                                               skip_if ? skip_if->data_ptr<float>() : nullptr},
                        stream);
}

// ------------------------------------------------------------------ nonfinite_
struct NonfiniteBody {
  AnyPtr x;
  float inv;  // the unscale factor, read once per block (unscale: false: check only)
  bool unscale;
  int64_t len;
  int* bad;
  float* sq;  // sum of squares of the stored values
  __device__ __forceinline__ void step(int64_t i) const {
    float y[kILP];
    load(x, i, len, y);
    if (unscale) {
#pragma unroll
      for (int j = 0; j < kILP; ++j) y[j] = stored(x.code, y[j] * inv);
      store(x, i, len, y);
    }
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      const bool in = i + j < len;  // a lane past the tail holds 0 * inv (NaN for inv = inf)
      *bad |= in && !finite(y[j]) ? 1 : 0;
      *sq += in ? y[j] * y[j] : 0.0f;
    }
  }
};

struct NonfiniteFn {
  int code;               // dtype code of this launch series' tensors
  const float* inv;       // device scalar or nullptr
  float* flag;
  float* partial;         // sq_norms: one slot per global chunk of this dtype's launch series
  int32_t* chunk_tensor;  // sq_norms: the tensor (index in the op's list) of each such chunk
  __device__ void operator()(const Table<1>& tab) const {
    const Loc l = locate(tab);
    int bad = 0;
    float sq = 0.0f;
    for_ilp(l.len, NonfiniteBody{any_at(tab, 0, l, code), inv ? *inv : 1.0f, inv != nullptr, l.len, &bad, &sq});
    if (bad) *flag = 1.0f;  // every writer stores the same value: order-free
    if (partial) {
      const int64_t g = global_chunk(tab, chunk_tensor, l);
      const float s = block_sum(sq);
      if (threadIdx.x == 0) partial[g] = s;
    }
  }
};

at::Tensor nonfinite_cuda(at::TensorList tensors, const c10::optional<at::Tensor>& inv_scale,
                          at::IntArrayRef list_sizes, bool sq_norms) {
  // no tensors (reached only with a CUDA inv_scale): the CPU op's zeros, on that device
  TORCH_CHECK(!tensors.empty() || inv_scale, "nonfinite_: no tensors");
  const at::Device dev = tensors.empty() ? inv_scale->device() : tensors[0].device();
  check_cuda(dev, "nonfinite_");
  c10::cuda::CUDAGuard guard(dev);
  // every argument is validated before the first (in-place unscaling) launch, in
  // ops_cpu.cpp's order: tensors, inv_scale, list_sizes (also without sq_norms)
  const int64_t n = static_cast<int64_t>(tensors.size());
  for (int64_t i = 0; i < n; ++i) {  // dtypes may differ between tensors
    std::vector<int64_t> one;
    check_list(tensors.slice(i, 1), "nonfinite_", "tensors", dev, one);
  }
  check_scalar(inv_scale, "nonfinite_", "inv_scale", dev);
  const auto bounds = list_bounds(list_sizes, n);
  // sq_norms: [flag, ||list 0||^2, ...], the squares summed in the checking pass: per chunk
  // (partials), per tensor (in chunk order), per list (in tensor order), as multi_dot does
  const int64_t L = static_cast<int64_t>(bounds.size()) - 1;
  const std::vector<int64_t> shape = sq_norms ? std::vector<int64_t>{1 + L} : std::vector<int64_t>{};
  auto out = at::zeros(shape, at::TensorOptions().dtype(at::kFloat).device(dev));
  std::vector<int64_t> all;
  for (const auto& t : tensors) all.push_back(t.numel());
  const int64_t C = sq_norms ? total_chunks(all) : 0;
  at::Tensor partial, chunk_tensor, per;
  if (C > 0) {
    partial = at::empty({C}, out.options());
    chunk_tensor = at::empty({C}, at::TensorOptions().dtype(at::kInt).device(dev));
    per = at::zeros({n}, at::TensorOptions().dtype(at::kDouble).device(dev));
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const float* inv = inv_scale ? inv_scale->data_ptr<float>() : nullptr;
  std::vector<void*> all_ptrs = ptrs<void>(tensors);
  int64_t c0 = 0;  // first chunk slot of this dtype's launch series
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};  // index: dtype code
  for (int st_code = 0; st_code < 3; ++st_code) {  // one launch series per dtype
    const at::ScalarType st = dtypes[st_code];
    std::vector<int64_t> numels(all);  // the other dtypes' tensors are skipped (numel 0)
    for (int64_t i = 0; i < n; ++i) {
      if (tensors[i].scalar_type() != st) numels[i] = 0;
    }
    const int64_t Cs = total_chunks(numels);
    if (Cs == 0) continue;
    float* pp = C > 0 ? partial.data_ptr<float>() + c0 : nullptr;
    int32_t* ct = C > 0 ? chunk_tensor.data_ptr<int32_t>() + c0 : nullptr;
    multi_tensor_apply<1>({all_ptrs}, numels, NonfiniteFn{st_code, inv, out.data_ptr<float>(), pp, ct}, stream);
    if (C > 0) per_tensor_sums(pp, Cs, ct, n, 1, per.data_ptr<double>(), stream);
    c0 += Cs;
  }
  if (C > 0) sum_segments(per.data_ptr<double>(), bounds, out.data_ptr<float>() + 1, nullptr, stream);
  return out;
}

}  // namespace

// The five ops' CUDA kernels, for the registration below (and the emulated build's, csrc/emu/).
inline void register_ops(torch::Library& m) {
  m.impl("multi_dot", &multi_dot_cuda);
  m.impl("perturb_", &perturb_cuda);
  m.impl("combine_step_", &combine_step_cuda);
  m.impl("lookahead_sync_", &lookahead_sync_cuda);
  m.impl("nonfinite_", &nonfinite_cuda);
}

}  // namespace cuda
}  // namespace la

#ifndef LA_CUDA_EMU
TORCH_LIBRARY_IMPL(lookahead_ext, CUDA, m) { la::cuda::register_ops(m); }
#endif
