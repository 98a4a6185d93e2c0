// CUDA kernels of the five ops (schemas in schemas.cpp, element-wise math in la_math.h,
// shared with the CPU kernels). The fused reductions of the CPU backend are emulated here
// with the multi_dot kernels (correct and deterministic, one extra read pass, no host
// sync): combine_step_'s v_sq_out (multi_dot on the updated v, added on the device) and
// nonfinite_'s sq_norms (multi_dot per list after the check). Every op is one multi-tensor launch per up to
// kMaxBlocks chunks (multi_tensor.cuh); reductions write one float partial per chunk
// (fixed slots, no float atomics) and two cleanup kernels sum them in a fixed order, so
// results are bitwise reproducible run to run. Device scalars (perturb scale, v
// coefficients, AMP inv_scale) are read in-kernel through pointers: no host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "la_math.h"
#include "multi_tensor.cuh"
#include "op_args.h"

namespace la {
namespace cuda {
namespace {

template <class T>
__device__ __forceinline__ bool all_aligned(T p) { return aligned(p); }
template <class T, class... R>
__device__ __forceinline__ bool all_aligned(T p, R... r) { return aligned(p) && all_aligned(r...); }

// ------------------------------------------------------------------ multi_dot
template <class A, class B>
struct DotBody {
  const A* a;
  const B* b;
  int64_t len;
  float* acc;
  template <bool VEC>
  __device__ __forceinline__ void step(int64_t i) const {
    float x[kILP], y[kILP];
    load<VEC>(a, i, len, x);
    load<VEC>(b, i, len, y);
#pragma unroll
    for (int j = 0; j < kILP; ++j) *acc += x[j] * y[j];
  }
};

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

template <class A, class B>
struct DotFn {
  float* partial;  // one slot per global chunk
  __device__ void operator()(const Table<2>& tab) const {
    const Loc l = locate(tab);
    const A* a = at_chunk<const A>(tab, 0, l);
    const B* b = at_chunk<const B>(tab, 1, l);
    float acc = 0.0f;
    for_ilp(l.len, all_aligned(a, b), DotBody<A, B>{a, b, l.len, &acc});
    const float s = block_sum(acc);
    if (threadIdx.x == 0) partial[tab.block_base + blockIdx.x] = s;
  }
};

// per[p][t] = sum of tensor t's chunk partials, in chunk order (then a fixed tree)
__global__ void dot_per_tensor(const float* partial, int64_t C, const int64_t* off, int64_t n, double* per) {
  const int64_t t = blockIdx.x, p = blockIdx.y;
  double s = 0.0;
  for (int64_t c = off[t] + threadIdx.x; c < off[t + 1]; c += blockDim.x) s += partial[p * C + c];
  s = block_sum(s);
  if (threadIdx.x == 0) per[p * n + t] = s;
}

__global__ void dot_total(const double* per, int64_t n, float* out_per, float* out_sum) {
  const int64_t p = blockIdx.x;
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    s += per[p * n + t];
    out_per[p * n + t] = static_cast<float>(per[p * n + t]);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) out_sum[p] = static_cast<float>(s);
}

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

// The dispatcher picks these CUDA kernels when *any* tensor argument is on CUDA, so the
// op's device (its first tensor's) may be the CPU: CUDAGuard would then fail an internal
// assert; raise the device error that check_list gives instead.
inline void check_cuda(const at::Device& dev, const char* op) {
  TORCH_CHECK(dev.is_cuda(), op, ": the first tensor is on ", dev,
              " but the op runs on CUDA (all tensors must share one device)");
}

template <class F>
void dispatch3(at::ScalarType t, const F& f) {
  dispatch_float(t, "lookahead_ext (cuda)", [&](auto tag) {
    using C = decltype(tag);
    using T = std::conditional_t<std::is_same_v<C, float>, float,
                                 std::conditional_t<std::is_same_v<C, c10::BFloat16>, bf16, f16>>;
    f(T{});
  });
}

at::Tensor multi_dot_cuda(at::TensorList tensors, int64_t n_lists, at::IntArrayRef pairs, bool per_tensor) {
  TORCH_CHECK(n_lists >= 1 && static_cast<int64_t>(tensors.size()) % n_lists == 0,
              "multi_dot: tensors must hold n_lists lists of equal length");
  TORCH_CHECK(pairs.size() % 2 == 0, "multi_dot: pairs must be a flat list of (i, j)");
  TORCH_CHECK(!tensors.empty(), "multi_dot: no tensors");
  const at::Device dev = tensors[0].device();
  check_cuda(dev, "multi_dot");
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(tensors.size()) / n_lists;
  const int64_t P = static_cast<int64_t>(pairs.size()) / 2;
  std::vector<at::TensorList> lists;
  std::vector<int64_t> numels;
  for (int64_t l = 0; l < n_lists; ++l) {
    lists.push_back(tensors.slice(l * n, n));
    check_list(lists.back(), "multi_dot", "tensors", dev, numels);
  }
  for (int64_t p = 0; p < 2 * P; ++p) {
    TORCH_CHECK(pairs[p] >= 0 && pairs[p] < n_lists, "multi_dot: pair index ", pairs[p], " out of range");
  }
  const auto off = chunk_offsets(numels);
  const int64_t C = off.back();
  auto fopt = at::TensorOptions().dtype(at::kFloat).device(dev);
  auto out_per = at::zeros({P, n}, fopt);
  auto out_sum = at::zeros({P}, fopt);
  if (C == 0 || P == 0) return per_tensor ? out_per : out_sum;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  auto partial = at::empty({P, C}, fopt);
  for (int64_t p = 0; p < P; ++p) {
    at::TensorList a = lists[pairs[2 * p]], b = lists[pairs[2 * p + 1]];
    dispatch3(a[0].scalar_type(), [&](auto ta) {
      dispatch3(b[0].scalar_type(), [&](auto tb) {
        DotFn<decltype(ta), decltype(tb)> f{partial.data_ptr<float>() + p * C};
        multi_tensor_apply<2>({ptrs<void>(a), ptrs<void>(b)}, numels, f, stream);
      });
    });
  }
  // chunk offsets to the device through pinned memory: an asynchronous copy, no host sync
  auto off_h = at::empty({n + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(off.begin(), off.end(), off_h.data_ptr<int64_t>());
  auto off_d = off_h.to(dev, /*non_blocking=*/true);
  auto per = at::empty({P, n}, at::TensorOptions().dtype(at::kDouble).device(dev));
  dot_per_tensor<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(P)), kThreads, 0, stream>>>(
      partial.data_ptr<float>(), C, off_d.data_ptr<int64_t>(), n, per.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dot_total<<<static_cast<unsigned>(P), kThreads, 0, stream>>>(per.data_ptr<double>(), n,
                                                               out_per.data_ptr<float>(), out_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return per_tensor ? out_per : out_sum;
}

// ------------------------------------------------------------------ perturb_
template <class O, class B, class D>
struct PerturbBody {
  O* o;
  B* b;
  const D* d;
  B* k;
  float s;
  int64_t len;
  template <bool VEC>
  __device__ __forceinline__ void step(int64_t i) const {
    float x[kILP], y[kILP], r[kILP];
    load<VEC>(b, i, len, x);
    load<VEC>(d, i, len, y);
    if (k) store<VEC>(k, i, len, x);  // exact: x is the float value of a B
#pragma unroll
    for (int j = 0; j < kILP; ++j) r[j] = perturb(x[j], y[j], s);
    store<VEC>(o, i, len, r);
  }
};

template <class O, class B, class D>
struct PerturbFn {
  const float* scale_t;  // device scalar or nullptr
  float scale_f;
  __device__ void operator()(const Table<4>& tab) const {
    const Loc l = locate(tab);
    O* o = at_chunk<O>(tab, 0, l);
    B* b = at_chunk<B>(tab, 1, l);
    const D* d = at_chunk<const D>(tab, 2, l);
    B* k = tab.addr[3][l.slot] ? at_chunk<B>(tab, 3, l) : nullptr;
    const float s = (scale_t ? *scale_t : 1.0f) * scale_f;
    for_ilp(l.len, all_aligned(o, b, d, k), PerturbBody<O, B, D>{o, b, d, k, s, l.len});
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
  check_scalar(scale_t, "perturb_", "scale", dev);
  if (out.empty()) return;
  check_out_base(out, base);  // as on the CPU: out may be base only with base's dtype
  const auto ot = out[0].scalar_type(), bt = base[0].scalar_type(), dt = direction[0].scalar_type();
  TORCH_CHECK(bt == at::kFloat || bt == ot, "perturb_ (cuda): base must be float32 or the dtype of out");
  TORCH_CHECK(dt == at::kFloat || dt == ot, "perturb_ (cuda): direction must be float32 or the dtype of out");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const float* sp = scale_t ? scale_t->data_ptr<float>() : nullptr;
  std::vector<std::vector<void*>> lists = {ptrs<void>(out), ptrs<void>(base), ptrs<void>(direction),
                                           backup.empty() ? std::vector<void*>() : ptrs<void>(backup)};
  dispatch3(ot, [&](auto to) {
    using O = decltype(to);
    auto run = [&](auto tb, auto td) {
      PerturbFn<O, decltype(tb), decltype(td)> f{sp, static_cast<float>(scale_f)};
      multi_tensor_apply<4>(lists, numels, f, stream);
    };
    if (bt == at::kFloat && dt == at::kFloat) run(float{}, float{});
    else if (bt == at::kFloat) run(float{}, O{});
    else if (dt == at::kFloat) run(O{}, float{});
    else run(O{}, O{});
  });
}

// ------------------------------------------------------------------ combine_step_
struct CombineScalars {
  Combine k;
  Sgd sgd;
  AdamW adamw;
  float vc_f[4];
  const float* vc_t[4];  // device scalars (nullptr: the host float vc_f)
  bool r0, rp, rm, has_s1, has_v;
  bool write_w;  // false: masters are only read (write_masters=false), the new w goes to params
};

template <class P, class G, bool ADAM>
struct CombineBody {
  P* p;
  float* w;
  const G* g0;
  const G* gp;
  const G* gm;
  float* s1;
  float* s2;
  float* v;
  CombineScalars c;  // by value: registers, not a pointer into kernel-parameter space
  float vc[4];
  int64_t len;
  template <bool VEC>
  __device__ __forceinline__ void step(int64_t i) const {
    float wv[kILP], f0[kILP] = {0}, fp[kILP] = {0}, fm[kILP] = {0}, b1[kILP] = {0}, b2[kILP] = {0}, vv[kILP];
    load<VEC>(w, i, len, wv);
    if (c.r0) load<VEC>(g0, i, len, f0);
    if (c.rp) load<VEC>(gp, i, len, fp);
    if (c.rm) load<VEC>(gm, i, len, fm);
    if (c.has_s1) load<VEC>(s1, i, len, b1);
    if (ADAM) load<VEC>(s2, i, len, b2);
    if (c.has_v) load<VEC>(v, i, len, vv);
#pragma unroll
    for (int j = 0; j < kILP; ++j) {
      const float d = direction(c.k, f0[j], fp[j], fm[j]);
      if (c.has_v) vv[j] = momentum_v(c.k, vv[j], f0[j], fp[j], fm[j], vc[0], vc[1], vc[2], vc[3]);
      wv[j] = ADAM ? adamw(c.adamw, wv[j], d, &b1[j], &b2[j]) : sgd(c.sgd, wv[j], d, &b1[j]);
    }
    if (c.write_w) store<VEC>(w, i, len, wv);
    store<VEC>(p, i, len, wv);
    if (c.has_s1) store<VEC>(s1, i, len, b1);
    if (ADAM) store<VEC>(s2, i, len, b2);
    if (c.has_v) store<VEC>(v, i, len, vv);
  }
};

template <class P, class G, bool ADAM>
struct CombineFn {
  CombineScalars cs;
  __device__ void operator()(const Table<8>& tab) const {
    const Loc l = locate(tab);
    CombineBody<P, G, ADAM> b;
    b.p = at_chunk<P>(tab, 0, l);
    b.w = at_chunk<float>(tab, 1, l);
    b.g0 = cs.r0 ? at_chunk<const G>(tab, 2, l) : nullptr;
    b.gp = cs.rp ? at_chunk<const G>(tab, 3, l) : nullptr;
    b.gm = cs.rm ? at_chunk<const G>(tab, 4, l) : nullptr;
    b.s1 = cs.has_s1 ? at_chunk<float>(tab, 5, l) : nullptr;
    b.s2 = ADAM ? at_chunk<float>(tab, 6, l) : nullptr;
    b.v = cs.has_v ? at_chunk<float>(tab, 7, l) : nullptr;
    b.c = cs;
    for (int j = 0; j < 4; ++j) b.vc[j] = cs.vc_t[j] ? *cs.vc_t[j] : cs.vc_f[j];
    b.len = l.len;
    for_ilp(l.len, all_aligned(b.p, b.w, b.g0, b.gp, b.gm, b.s1, b.s2, b.v), b);
  }
};

void combine_step_cuda(at::TensorList params, at::TensorList masters, at::TensorList g0, at::TensorList gp,
                       at::TensorList gm, at::ArrayRef<double> coefs, at::TensorList state1,
                       at::TensorList state2, at::TensorList v, const OptTensors& v_coefs_t,
                       at::ArrayRef<double> v_coefs_f, int64_t kind, at::ArrayRef<double> hyper,
                       at::IntArrayRef flags, const c10::optional<at::Tensor>& v_sq_out, bool write_masters) {
  const char* op = "combine_step_";
  // empty params: the other lists are still validated (ops_cpu.cpp does), then nothing to do
  auto d0 = first_device({params, masters, g0, gp, gm, state1, state2, v});
  if (!d0 && v_sq_out) d0 = v_sq_out->device();
  if (!d0) return;
  const at::Device dev = *d0;
  check_cuda(dev, op);
  c10::cuda::CUDAGuard guard(dev);
  check_combine_extras(op, params, masters, v, v_sq_out, write_masters, dev);
  std::vector<int64_t> numels;
  check_list(params, op, "params", dev, numels);
  check_list(masters, op, "masters", dev, numels, at::kFloat);
  at::ScalarType gdt = at::kFloat;
  bool gset = false;
  for (const at::TensorList* g : {&g0, &gp, &gm}) {
    if (g->empty()) continue;
    check_list(*g, op, "grads", dev, numels, gset ? c10::optional<at::ScalarType>(gdt) : c10::nullopt);
    gdt = (*g)[0].scalar_type();
    gset = true;
  }
  TORCH_CHECK(kind == kSgd || kind == kAdamW, op, ": kind must be 0 (SGD) or 1 (AdamW)");
  if (!state1.empty()) check_list(state1, op, "state1", dev, numels, at::kFloat);
  if (!state2.empty()) check_list(state2, op, "state2", dev, numels, at::kFloat);
  if (!v.empty()) check_list(v, op, "v", dev, numels, at::kFloat);
  TORCH_CHECK(kind != kAdamW || params.empty() || (!state1.empty() && !state2.empty()), op,
              ": AdamW needs exp_avg and exp_avg_sq");
  if (!v.empty()) check_vcoefs(v_coefs_t, v_coefs_f, dev);
  if (params.empty()) return;
  // as on the CPU: written lists must not share memory (params may be their own masters)
  check_distinct(op, 5, {{"params", params}, {"masters", masters}, {"state1", state1}, {"state2", state2}, {"v", v},
                      {"g0", g0}, {"gp", gp}, {"gm", gm}}, /*params_alias_masters=*/true);
  const auto pt = params[0].scalar_type();
  if (!gset) gdt = pt;
  // CUDA-only restriction (not instantiated: mixed low-precision grads/params pairs)
  TORCH_CHECK(gdt == pt || gdt == at::kFloat, op, " (cuda): grads must be float32 or the params' dtype");
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
  for (int i = 0; i < 4; ++i) {
    cs.vc_t[i] = cs.has_v ? vcoef_ptr(v_coefs_t, static_cast<size_t>(i)) : nullptr;
    cs.vc_f[i] = cs.has_v ? static_cast<float>(v_coefs_f[i]) : 0.0f;
  }
  auto opt = [](at::TensorList l) { return l.empty() ? std::vector<void*>() : ptrs<void>(l); };
  std::vector<std::vector<void*>> lists = {ptrs<void>(params), ptrs<void>(masters), opt(g0), opt(gp), opt(gm),
                                           cs.has_s1 ? opt(state1) : std::vector<void*>(),
                                           adam ? opt(state2) : std::vector<void*>(), opt(v)};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  dispatch3(pt, [&](auto tp) {
    using P = decltype(tp);
    auto run = [&](auto tg) {
      using G = decltype(tg);
      if (adam) multi_tensor_apply<8>(lists, numels, CombineFn<P, G, true>{cs}, stream);
      else multi_tensor_apply<8>(lists, numels, CombineFn<P, G, false>{cs}, stream);
    };
    if (gdt == at::kFloat) run(float{});
    else run(P{});
  });
  if (v_sq_out && !v.empty()) {  // sum v_new^2: multi_dot's kernels on the stored v, added on device
    const std::vector<int64_t> pair = {0, 0};
    v_sq_out->add_(multi_dot_cuda(v, 1, pair, false).reshape(v_sq_out->sizes()));
  }
}

// ------------------------------------------------------------------ lookahead_sync_
template <class F, class Q>
struct SyncBody {
  float* s;
  F* f;
  Q* q;
  float alpha;
  int64_t len;
  template <bool VEC>
  __device__ __forceinline__ void step(int64_t i) const {
    float x[kILP], y[kILP];
    load<VEC>(s, i, len, x);
    load<VEC>(f, i, len, y);
#pragma unroll
    for (int j = 0; j < kILP; ++j) x[j] = lookahead(x[j], y[j], alpha);
    store<VEC>(s, i, len, x);
    store<VEC>(f, i, len, x);
    if (q) store<VEC>(q, i, len, x);
  }
};

template <class F, class Q>
struct SyncFn {
  float alpha;
  __device__ void operator()(const Table<3>& tab) const {
    const Loc l = locate(tab);
    float* s = at_chunk<float>(tab, 0, l);
    F* f = at_chunk<F>(tab, 1, l);
    Q* q = tab.addr[2][l.slot] ? at_chunk<Q>(tab, 2, l) : nullptr;
    for_ilp(l.len, all_aligned(s, f, q), SyncBody<F, Q>{s, f, q, alpha, l.len});
  }
};

void lookahead_sync_cuda(at::TensorList slow, at::TensorList fast, double alpha, at::TensorList params) {
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
  if (slow.empty()) return;
  check_distinct("lookahead_sync_", 3, {{"slow", slow}, {"fast", fast}, {"params", params}});  // as on the CPU
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  std::vector<std::vector<void*>> lists = {ptrs<void>(slow), ptrs<void>(fast),
                                           params.empty() ? std::vector<void*>() : ptrs<void>(params)};
  dispatch3(fast[0].scalar_type(), [&](auto tf) {
    dispatch3(params.empty() ? at::kFloat : params[0].scalar_type(), [&](auto tq) {
      multi_tensor_apply<3>(lists, numels, SyncFn<decltype(tf), decltype(tq)>{static_cast<float>(alpha)}, stream);
    });
  });
}

// ------------------------------------------------------------------ nonfinite_
template <class T>
struct NonfiniteBody {
  T* x;
  const float* inv;  // nullptr: check only
  int64_t len;
  int* bad;
  template <bool VEC>
  __device__ __forceinline__ void step(int64_t i) const {
    float y[kILP];
    load<VEC>(x, i, len, y);
    if (inv) {
      const float s = *inv;
#pragma unroll
      for (int j = 0; j < kILP; ++j) y[j] = to_f(from_f<T>(y[j] * s));  // the stored value
      store<VEC>(x, i, len, y);
    }
#pragma unroll
    for (int j = 0; j < kILP; ++j) *bad |= finite(y[j]) ? 0 : 1;
  }
};

template <class T>
struct NonfiniteFn {
  const float* inv;
  float* flag;
  __device__ void operator()(const Table<1>& tab) const {
    const Loc l = locate(tab);
    T* x = at_chunk<T>(tab, 0, l);
    int bad = 0;
    for_ilp(l.len, aligned(x), NonfiniteBody<T>{x, inv, l.len, &bad});
    if (bad) *flag = 1.0f;  // every writer stores the same value: order-free
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
  for (size_t i = 0; i < tensors.size(); ++i) {  // dtypes may differ between tensors
    std::vector<int64_t> one;
    check_list(tensors.slice(i, 1), "nonfinite_", "tensors", dev, one);
  }
  check_scalar(inv_scale, "nonfinite_", "inv_scale", dev);
  const auto bounds = list_bounds(list_sizes, static_cast<int64_t>(tensors.size()));
  auto flag = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(dev));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const float* inv = inv_scale ? inv_scale->data_ptr<float>() : nullptr;
  for (auto st : {at::kFloat, at::kBFloat16, at::kHalf}) {  // one launch series per dtype
    std::vector<at::Tensor> group;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].scalar_type() == st) group.push_back(tensors[i]);
    }
    if (group.empty()) continue;
    std::vector<int64_t> numels;
    for (const auto& t : group) numels.push_back(t.numel());
    dispatch3(st, [&](auto tt) {
      multi_tensor_apply<1>({ptrs<void>(group)}, numels, NonfiniteFn<decltype(tt)>{inv, flag.data_ptr<float>()},
                            stream);
    });
  }
  if (!sq_norms) return flag;
  // the squared norm of each list, of the stored (unscaled) values: multi_dot per list (per
  // tensor, summed in order, where a list mixes dtypes)
  const int64_t L = static_cast<int64_t>(bounds.size()) - 1;
  auto out = at::zeros({1 + L}, at::TensorOptions().dtype(at::kFloat).device(dev));
  out.narrow(0, 0, 1).copy_(flag.reshape({1}));
  const std::vector<int64_t> pair = {0, 0};
  for (int64_t l = 0; l < L; ++l) {
    at::TensorList lst = tensors.slice(bounds[l], bounds[l + 1] - bounds[l]);
    if (lst.empty()) continue;
    bool uniform = true;
    for (const auto& t : lst) uniform = uniform && t.scalar_type() == lst[0].scalar_type();
    if (uniform) {
      out.narrow(0, 1 + l, 1).copy_(multi_dot_cuda(lst, 1, pair, false));
    } else {
      for (size_t i = 0; i < lst.size(); ++i) out.narrow(0, 1 + l, 1).add_(multi_dot_cuda(lst.slice(i, 1), 1, pair, false));
    }
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace la

TORCH_LIBRARY_IMPL(lookahead_ext, CUDA, m) {
  m.impl("multi_dot", &la::cuda::multi_dot_cuda);
  m.impl("perturb_", &la::cuda::perturb_cuda);
  m.impl("combine_step_", &la::cuda::combine_step_cuda);
  m.impl("lookahead_sync_", &la::cuda::lookahead_sync_cuda);
  m.impl("nonfinite_", &la::cuda::nonfinite_cuda);
}
