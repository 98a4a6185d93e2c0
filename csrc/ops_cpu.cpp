// Torch glue of the CPU ops: argument checks, the chunk table, the ISA choice, and the
// deterministic cleanup of reductions. The kernels are cpu_kernels.h (compiled per ISA);
// their element-wise math is la_math.h, the same header the CUDA kernels use.
//
// Every op walks one table of fixed-size chunks (kChunk elements of one tensor) with one
// OpenMP loop, so many tensors of mixed sizes share one parallel region and each element
// is read and written once. Reductions write one partial per chunk (fixed slots, whatever
// the thread count) and sum them in a fixed order: results are bitwise reproducible for
// any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_kernels_api.h"
#include "op_args.h"

namespace la {
namespace {

using cpu::Chunk;

constexpr int64_t kChunk = 1 << 14;        // elements per work item: 64 KiB of fp32. 64K-element chunks left
                                           // a 0.1M-param CNN as 9 uneven items (2 threads: one got 75%);
                                           // measured equal at 16M params (chunk overhead is per 16K elements)
constexpr int64_t kSerialBelow = 1 << 16;  // total elements under which threads do not pay
constexpr int64_t kNtMinDefault = 1 << 23;  // elements per call from which NT stores pay: ~ the L3 (32 MiB of fp32)
                                            // (measured in a perturb/nonfinite/combine chain: NT loses below)

// LOOKAHEAD_EXT_CPU_ISA=base|avx2 forces a kernel set (tests run both); default: the best.
const cpu::Kernels& kernels() {
  const char* env = std::getenv("LOOKAHEAD_EXT_CPU_ISA");
  const bool avx2 = cpu::kernels_avx2.isa != nullptr && cpu::avx2_supported();
  if (env && std::strcmp(env, "base") == 0) return cpu::kernels_base;
  if (env && std::strcmp(env, "avx2") == 0) {
    TORCH_CHECK(avx2, "LOOKAHEAD_EXT_CPU_ISA=avx2 but the AVX2 kernels are not built or not supported here");
  }
  return avx2 ? cpu::kernels_avx2 : cpu::kernels_base;
}

std::string cpu_isa() { return kernels().isa; }

// Streaming stores (cpu_kernels.h) for calls that write at least this many elements:
// below it the output stays cache-resident for the next op and plain stores win.
// LOOKAHEAD_EXT_CPU_NT_MIN sets it at load time, torch.ops.lookahead_ext.set_cpu_nt_min
// at run time (tests force 0 = always and a huge value = never).
std::atomic<int64_t>& nt_min() {
  static std::atomic<int64_t> v{[] {
    const char* env = std::getenv("LOOKAHEAD_EXT_CPU_NT_MIN");
    return env ? std::atoll(env) : kNtMinDefault;
  }()};
  return v;
}

int64_t set_cpu_nt_min(int64_t n) { return nt_min().exchange(n); }

struct Table {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  cpu::Work work(int64_t bytes_per_elem = 1) const {
    const int threads = total * bytes_per_elem < kSerialBelow * 4 ? 1 : at::get_num_threads();
    return {chunks.data(), static_cast<int64_t>(chunks.size()), threads, total >= nt_min().load()};
  }
};

Table make_table(const std::vector<int64_t>& numels) {
  Table t;
  size_t n = 0;
  for (int64_t x : numels) n += static_cast<size_t>((x + kChunk - 1) / kChunk);
  t.chunks.reserve(n);
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t b = 0; b < numels[i]; b += kChunk) {
      t.chunks.push_back({static_cast<int64_t>(i), b, std::min(numels[i], b + kChunk)});
    }
    t.total += numels[i];
  }
  return t;
}

// The deterministic cleanup of a reduction with one partial per chunk: per-tensor sums in
// chunk order (double), then totals in tensor order over [t0, t1).
std::vector<double> tensor_sums(const Table& tab, const double* partial, int64_t n) {
  std::vector<double> per(static_cast<size_t>(n), 0.0);
  const int64_t C = static_cast<int64_t>(tab.chunks.size());
  for (int64_t c = 0; c < C; ++c) per[tab.chunks[c].t] += partial[c];
  return per;
}

double total(const std::vector<double>& per, int64_t t0, int64_t t1) {
  double tot = 0.0;
  for (int64_t t = t0; t < t1; ++t) tot += per[t];
  return tot;
}

float read_scalar(const c10::optional<at::Tensor>& t, float dflt) {
  return t ? *t->data_ptr<float>() : dflt;  // checked: one float32 element on the CPU
}

// check_distinct / check_out_base: checks.h (shared with the CUDA ops, same errors)

int code(at::ScalarType t) { return t == at::kFloat ? 0 : t == at::kBFloat16 ? 1 : 2; }

template <class T = void>
std::vector<T*> ptrs(at::TensorList ts) {
  std::vector<T*> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(static_cast<T*>(t.data_ptr()));
  return out;
}

// ------------------------------------------------------------------ multi_dot
at::Tensor multi_dot_cpu(at::TensorList tensors, int64_t n_lists, at::IntArrayRef pairs, bool per_tensor) {
  std::vector<int64_t> numels;
  const auto lists = dot_lists(tensors, n_lists, pairs, at::Device(at::kCPU), numels);
  const int64_t n = static_cast<int64_t>(tensors.size()) / n_lists;
  const int64_t P = static_cast<int64_t>(pairs.size()) / 2;
  const Table tab = make_table(numels);
  const int64_t C = static_cast<int64_t>(tab.chunks.size());
  std::vector<double> partial(static_cast<size_t>(P * C), 0.0);  // fixed slot per (pair, chunk)
  std::vector<std::vector<const void*>> lp;
  std::vector<const void* const*> lpp;
  std::vector<int> types;
  for (int64_t l = 0; l < n_lists; ++l) {
    lp.push_back(ptrs<const void>(lists[l]));
    types.push_back(n > 0 ? code(lists[l][0].scalar_type()) : 0);
  }
  for (auto& v : lp) lpp.push_back(v.data());
  std::vector<int> pr(pairs.begin(), pairs.end());
  if (n > 0 && P > 0) {
    // one pass over every list for all pairs (bytes per element: each distinct list once)
    std::vector<bool> used(static_cast<size_t>(n_lists), false);
    for (int x : pr) used[x] = true;
    int64_t bytes = 0;
    for (int64_t l = 0; l < n_lists; ++l) bytes += used[l] ? 4 : 0;
    cpu::DotArgs args{tab.work(bytes), lpp.data(), types.data(), pr.data(), static_cast<int>(P), partial.data()};
    kernels().dot(args);
  }
  // cleanup pass: per-tensor sums in chunk order, then the total in tensor order
  auto out = at::zeros({P, n}, at::TensorOptions().dtype(at::kFloat));
  auto sums = at::zeros({P}, at::TensorOptions().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const std::vector<double> per = tensor_sums(tab, partial.data() + p * C, n);
    for (int64_t t = 0; t < n; ++t) po[p * n + t] = static_cast<float>(per[t]);
    sums.data_ptr<float>()[p] = static_cast<float>(total(per, 0, n));
  }
  return per_tensor ? out : sums;
}

// ------------------------------------------------------------------ perturb_
void perturb_cpu(at::TensorList out, at::TensorList base, at::TensorList direction,
                 const c10::optional<at::Tensor>& scale_t, double scale_f, at::TensorList backup) {
  const at::Device cpu(at::kCPU);
  std::vector<int64_t> numels;
  check_list(out, "perturb_", "out", cpu, numels);
  check_list(base, "perturb_", "base", cpu, numels);
  check_list(direction, "perturb_", "direction", cpu, numels);
  const bool has_backup = !backup.empty();
  if (has_backup && !base.empty()) check_list(backup, "perturb_", "backup", cpu, numels, base[0].scalar_type());
  check_scalar(scale_t, "perturb_", "scale", cpu);
  if (out.empty()) return;
  check_out_base(out, base);  // out may be base itself (in place), never a part of it
  const float scale = static_cast<float>(read_scalar(scale_t, 1.0f) * scale_f);
  const Table tab = make_table(numels);
  auto po = ptrs(out), pb = ptrs(base), pk = ptrs(backup);
  auto pd = ptrs<const void>(direction);
  cpu::PerturbArgs a{tab.work(12), po.data(), pb.data(), pd.data(), has_backup ? pk.data() : nullptr,
                     code(out[0].scalar_type()), code(base[0].scalar_type()), code(direction[0].scalar_type()),
                     scale};
  kernels().perturb(a);
}

// ------------------------------------------------------------------ combine_step_
// skip_if set: params <- cast(masters) (the restore of a probe point), nothing else written
void restore_params(at::TensorList params, at::TensorList masters) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].data_ptr() != masters[i].data_ptr()) params[i].copy_(masters[i]);
  }
}

bool skip_set(const c10::optional<at::Tensor>& skip_if) {
  return skip_if && *skip_if->data_ptr<float>() != 0.0f;  // checked: one float32 on the CPU (its device)
}

void combine_step_cpu(at::TensorList params, at::TensorList masters, at::TensorList g0, at::TensorList gp,
                      at::TensorList gm, at::ArrayRef<double> coefs, at::TensorList state1,
                      at::TensorList state2, at::TensorList v, const OptTensors& v_coefs_t,
                      at::ArrayRef<double> v_coefs_f, int64_t kind, at::ArrayRef<double> hyper_h,
                      at::IntArrayRef flags_h, const c10::optional<at::Tensor>& v_sq_out, bool write_masters,
                      const c10::optional<at::Tensor>& base_t, const c10::optional<at::Tensor>& skip_if) {
  const CombineLists chk = check_combine_args("combine_step_", params, masters, g0, gp, gm, state1, state2, v,
                                              v_coefs_t, v_coefs_f, kind, v_sq_out, write_masters, base_t, skip_if,
                                              at::Device(at::kCPU), /*host_scalars_ok=*/false);
  if (params.empty()) return;
  if (skip_set(skip_if)) {
    restore_params(params, masters);
    return;
  }
  const HostBase hb = host_base(hyper_h, flags_h, base_t);
  const at::ArrayRef<double> hyper(hb.hyper);
  const at::IntArrayRef flags(hb.flags);
  const std::vector<int64_t>& numels = chk.numels;
  const at::ScalarType gdt = chk.gdt;
  cpu::CombineArgs a{};
  a.k = make_combine(coefs, flags, !g0.empty(), !gp.empty(), !gm.empty(), !v.empty());
  a.adam = kind == kAdamW;
  if (a.adam) a.adamw = make_adamw(hyper);
  else a.sgd = make_sgd(hyper, flags, !state1.empty());
  for (int i = 0; i < 4 && !v.empty(); ++i) {
    const float* q = vcoef_ptr(v_coefs_t, static_cast<size_t>(i));
    a.vc[i] = q ? *q : static_cast<float>(v_coefs_f[i]);
  }
  const Table tab = make_table(numels);
  auto pp = ptrs(params);
  auto pw = ptrs<float>(masters), p1 = ptrs<float>(state1), p2 = ptrs<float>(state2), pv = ptrs<float>(v);
  auto q0 = ptrs<const void>(g0), qp = ptrs<const void>(gp), qm = ptrs<const void>(gm);
  a.w = tab.work(36);
  a.params = pp.data();
  a.masters = pw.data();
  a.g0 = q0.data();
  a.gp = qp.data();
  a.gm = qm.data();
  a.s1 = (a.adam || a.sgd.use_momentum) ? p1.data() : nullptr;
  a.s2 = a.adam ? p2.data() : nullptr;
  a.v = v.empty() ? nullptr : pv.data();
  a.tp = code(params[0].scalar_type());
  a.tg = code(gdt);
  a.write_masters = write_masters;
  std::vector<double> vsq;
  if (v_sq_out) {
    vsq.assign(tab.chunks.size(), 0.0);
    a.vsq_slot = vsq.data();
  }
  kernels().combine(a);
  if (v_sq_out) {  // the cleanup of multi_dot: bitwise its result on the stored v
    const auto per = tensor_sums(tab, vsq.data(), static_cast<int64_t>(params.size()));
    float* o = v_sq_out->data_ptr<float>();
    *o = *o + static_cast<float>(total(per, 0, static_cast<int64_t>(params.size())));
  }
}

// ------------------------------------------------------------------ lookahead_sync_
void lookahead_sync_cpu(at::TensorList slow, at::TensorList fast, double alpha, at::TensorList params,
                        const c10::optional<at::Tensor>& skip_if) {
  const at::Device cpu(at::kCPU);
  std::vector<int64_t> numels;
  check_list(slow, "lookahead_sync_", "slow", cpu, numels, at::kFloat);
  check_list(fast, "lookahead_sync_", "fast", cpu, numels);
  const bool has_p = !params.empty();
  if (has_p) check_list(params, "lookahead_sync_", "params", cpu, numels);
  check_skip_if("lookahead_sync_", skip_if, cpu);
  if (slow.empty() || skip_set(skip_if)) return;
  check_distinct("lookahead_sync_", 3, {{"slow", slow}, {"fast", fast}, {"params", params}});
  const Table tab = make_table(numels);
  auto ps = ptrs<float>(slow);
  auto pf = ptrs(fast), pq = ptrs(params);
  cpu::SyncArgs a{tab.work(20), ps.data(), pf.data(), has_p ? pq.data() : nullptr, code(fast[0].scalar_type()),
                  has_p ? code(params[0].scalar_type()) : 0, static_cast<float>(alpha)};
  kernels().sync(a);
}

// ------------------------------------------------------------------ nonfinite_
at::Tensor nonfinite_cpu(at::TensorList tensors, const c10::optional<at::Tensor>& inv_scale,
                         at::IntArrayRef list_sizes, bool sq_norms) {
  const at::Device cpu(at::kCPU);
  std::vector<int64_t> numels;
  std::vector<int> types;
  numels.reserve(tensors.size());
  types.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {  // dtypes may differ between tensors
    std::vector<int64_t> one;
    check_list(tensors.slice(i, 1), "nonfinite_", "tensors", cpu, one);
    numels.push_back(one[0]);
    types.push_back(code(tensors[i].scalar_type()));
  }
  check_scalar(inv_scale, "nonfinite_", "inv_scale", cpu);
  const auto bounds = list_bounds(list_sizes, static_cast<int64_t>(tensors.size()));
  const Table tab = make_table(numels);
  std::vector<uint8_t> bad(tab.chunks.size(), 0);  // one flag per chunk: no shared writes
  std::vector<double> sq(sq_norms ? tab.chunks.size() : 0, 0.0);
  auto px = ptrs(tensors);
  cpu::NonfiniteArgs a{tab.work(4), px.data(), types.data(), bad.data(), sq_norms ? sq.data() : nullptr,
                       inv_scale.has_value(), read_scalar(inv_scale, 1.0f)};
  kernels().nonfinite(a);
  float any = 0.0f;
  for (auto b : bad) any = b ? 1.0f : any;
  if (!sq_norms) return at::full({}, any, at::TensorOptions().dtype(at::kFloat));
  const int64_t L = static_cast<int64_t>(bounds.size()) - 1;
  auto out = at::empty({1 + L}, at::TensorOptions().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  po[0] = any;
  const auto per = tensor_sums(tab, sq.data(), static_cast<int64_t>(tensors.size()));
  for (int64_t l = 0; l < L; ++l) po[1 + l] = static_cast<float>(total(per, bounds[l], bounds[l + 1]));
  return out;
}

}  // namespace
}  // namespace la

TORCH_LIBRARY_FRAGMENT(lookahead_ext, m) {
  m.def("cpu_isa() -> str", &la::cpu_isa);  // which CPU kernel set runs: "avx2" or "base"
  // elements per call from which write-only outputs use streaming stores; returns the old value
  m.def("set_cpu_nt_min(int n) -> int", &la::set_cpu_nt_min);
}

TORCH_LIBRARY_IMPL(lookahead_ext, CPU, m) {
  m.impl("multi_dot", &la::multi_dot_cpu);
  m.impl("perturb_", &la::perturb_cpu);
  m.impl("combine_step_", &la::combine_step_cpu);
  m.impl("lookahead_sync_", &la::lookahead_sync_cpu);
  m.impl("nonfinite_", &la::nonfinite_cpu);
}
