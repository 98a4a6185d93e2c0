// The CPU kernels, included by each cpu_isa_*.cpp inside namespace la::cpu::LA_ISA.
// Each op walks the chunk table with one OpenMP loop; the per-element math is la_math.h.
//
// Every chunk is walked in blocks of kBlock (= kDotBlock) elements, the block grid of
// multi_dot: a fused reduction (v_sq_out of combine_step_, the norms of nonfinite_) runs
// dot_block over each block right after it is written, while it is in L1, so it adds to
// the same partials multi_dot would compute on that data (bitwise equal results).
// The element loops are `span` functions with __restrict__ parameters (GCC honours
// restrict on parameters, not on local pointers: with locals it versions the loop with
// run-time alias checks and gives up past ten of them, leaving the 8-stream combine loop
// scalar), branch-free in the element index, so the compiler vectorizes them.
//
// Streaming (non-temporal) stores: an output the op writes without reading it (perturb_'s
// out and backup, combine_step_'s params, lookahead_sync_'s params) is, for large calls
// (Work::nt), computed into an L1 block buffer with the very same code and then copied to
// memory with NT stores (nt_copy; scalar head/tail to 32-byte alignment), followed by
// an sfence. That skips the read-for-ownership of the destination line (4 B/elem for
// fp32). Only the ISA translation units that define LA_NT_STORES have them; elsewhere
// nt_copy is a memcpy and Work::nt is ignored.
#pragma once

#include "cpu_kernels_api.h"

namespace la {
namespace cpu {
namespace LA_ISA {

template <class F>
void for_chunks(const Work& w, const F& f) {
  if (w.threads <= 1) {  // no OpenMP region at all: its entry costs ~1 us per call
    for (int64_t c = 0; c < w.n_chunks; ++c) f(c, w.chunks[c]);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(w.threads)
  for (int64_t c = 0; c < w.n_chunks; ++c) f(c, w.chunks[c]);
}

#if defined(LA_NT_STORES)
constexpr bool kHaveNT = true;
// dst <- src (bytes, a multiple of the element size): NT stores on the 32-byte aligned
// middle, plain copies of the head and tail. Bitwise a memcpy.
static inline void nt_copy(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t head = static_cast<int64_t>((32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31);
  if (head > bytes) head = bytes;
  std::memcpy(d, s, static_cast<size_t>(head));
  int64_t i = head;
  for (; i + 32 <= bytes; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  }
  std::memcpy(d + i, s + i, static_cast<size_t>(bytes - i));
}
static inline void nt_fence() { _mm_sfence(); }
#else
constexpr bool kHaveNT = false;
static inline void nt_copy(void* dst, const void* src, int64_t bytes) {
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}
static inline void nt_fence() {}
#endif

template <class F>
void dispatch(int code, const F& f) {
  if (code == 0) f(float{});
  else if (code == 1) f(bf16{});
  else f(f16{});
}

// ------------------------------------------------------------------ multi_dot
// A block of kDotBlock elements is reduced in 32 fp32 lanes: four 8-float accumulators, each
// lane summing every 32nd product in index order, combined in a fixed tree and flushed into
// a double (so the fp32 error stays ~32 terms deep whatever the length). The lanes are GNU
// vector types, not a loop left to the auto-vectorizer: without FP reassociation the
// vectorizer may keep an in-order scalar reduction (GCC does under torch's -fwrapv), which
// ran at a third of memory bandwidth. Lane-wise vector arithmetic is exactly the scalar
// arithmetic per lane, so the result depends only on the data layout (chunk and block
// boundaries), never on the thread count.
constexpr int64_t kDotBlock = 1024;

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // V8 is passed only between this TU's own functions
typedef float V8 __attribute__((vector_size(32)));
typedef float V8u __attribute__((vector_size(32), aligned(4), may_alias));  // unaligned load
static inline V8 v8_zero() { return V8{0, 0, 0, 0, 0, 0, 0, 0}; }
static inline V8 v8_load(const float* p) { return *reinterpret_cast<const V8u*>(p); }
#else
struct V8 {
  float v[8];
  V8& operator+=(const V8& o) {
    for (int l = 0; l < 8; ++l) v[l] += o.v[l];
    return *this;
  }
  V8 operator*(const V8& o) const {
    V8 r;
    for (int l = 0; l < 8; ++l) r.v[l] = v[l] * o.v[l];
    return r;
  }
  V8 operator+(const V8& o) const {
    V8 r = *this;
    return r += o;
  }
  float operator[](int l) const { return v[l]; }
};
static inline V8 v8_zero() { return V8{{0, 0, 0, 0, 0, 0, 0, 0}}; }
static inline V8 v8_load(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#endif

template <class T>
V8 load8(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return v8_load(reinterpret_cast<const float*>(p));
  } else {
    float t[8];
    for (int l = 0; l < 8; ++l) t[l] = to_f(p[l]);
    return v8_load(t);
  }
}

// sum_{i<n} x[i] y[i] for n <= kDotBlock, in the fixed lane order above
template <class A, class B>
double dot_block(const void* xv, const void* yv, int64_t off, int64_t n) {
  const A* x = static_cast<const A*>(xv) + off;
  const B* y = static_cast<const B*>(yv) + off;
  V8 a0 = v8_zero(), a1 = v8_zero(), a2 = v8_zero(), a3 = v8_zero();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 += load8(x + i) * load8(y + i);
    a1 += load8(x + i + 8) * load8(y + i + 8);
    a2 += load8(x + i + 16) * load8(y + i + 16);
    a3 += load8(x + i + 24) * load8(y + i + 24);
  }
  if (i < n) {  // the block's tail, zero-padded to one more 32-lane step
    float tx[32] = {0}, ty[32] = {0};
    for (int64_t j = 0; i + j < n; ++j) {
      tx[j] = to_f(x[i + j]);
      ty[j] = to_f(y[i + j]);
    }
    a0 += load8(tx) * load8(ty);
    a1 += load8(tx + 8) * load8(ty + 8);
    a2 += load8(tx + 16) * load8(ty + 16);
    a3 += load8(tx + 24) * load8(ty + 24);
  }
  const V8 s = (a0 + a1) + (a2 + a3);
  return ((static_cast<double>(s[0]) + s[1]) + (static_cast<double>(s[2]) + s[3])) +
         ((static_cast<double>(s[4]) + s[5]) + (static_cast<double>(s[6]) + s[7]));
}

using DotFn = double (*)(const void*, const void*, int64_t, int64_t);

template <class A>
DotFn dot_fn_b(int tb) {
  return tb == 0 ? &dot_block<A, float> : tb == 1 ? &dot_block<A, bf16> : &dot_block<A, f16>;
}

static inline DotFn dot_fn(int ta, int tb) {
  return ta == 0 ? dot_fn_b<float>(tb) : ta == 1 ? dot_fn_b<bf16>(tb) : dot_fn_b<f16>(tb);
}

void k_dot(const DotArgs& a) {
  constexpr int kGroup = 8;  // pairs reduced together per block (more: further passes)
  const int64_t C = a.w.n_chunks;
  for (int g0 = 0; g0 < a.n_pairs; g0 += kGroup) {
    const int g = a.n_pairs - g0 < kGroup ? a.n_pairs - g0 : kGroup;
    DotFn fn[kGroup];
    int li[kGroup], lj[kGroup];
    for (int q = 0; q < g; ++q) {
      li[q] = a.pairs[2 * (g0 + q)];
      lj[q] = a.pairs[2 * (g0 + q) + 1];
      fn[q] = dot_fn(a.types[li[q]], a.types[lj[q]]);
    }
    for_chunks(a.w, [&](int64_t c, const Chunk& k) {
      double acc[kGroup] = {0};
      for (int64_t b = k.b; b < k.e; b += kDotBlock) {
        const int64_t n = k.e - b < kDotBlock ? k.e - b : kDotBlock;
        for (int q = 0; q < g; ++q) acc[q] += fn[q](a.lists[li[q]][k.t], a.lists[lj[q]][k.t], b, n);
      }
      for (int q = 0; q < g; ++q) a.slot[(g0 + q) * C + c] = acc[q];
    });
  }
}

// ------------------------------------------------------------------ blocks and stores
constexpr int64_t kBlock = kDotBlock;

// Runs f(b0, n) over the blocks of a chunk: [k.b + m kBlock, ...) clipped to k.e, the
// block grid of k_dot.
template <class F>
static inline void for_blocks(const Chunk& k, const F& f) {
  for (int64_t b0 = k.b; b0 < k.e; b0 += kBlock) f(b0, k.e - b0 < kBlock ? k.e - b0 : kBlock);
}

// dst[0..n) <- cast(src[0..n)), through `tmp` (a kBlock buffer) and NT stores when nt.
template <class T>
__attribute__((noinline)) static void cast_span(T* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = from_f<T>(src[j]);
}

template <class T>
static inline void store_cast(T* dst, const float* src, int64_t n, bool nt, T* tmp) {
  if constexpr (sizeof(T) == 4) {
    if (nt) nt_copy(dst, src, n * 4);
    else std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else {
    cast_span(nt ? tmp : dst, src, n);
    if (nt) nt_copy(dst, tmp, n * static_cast<int64_t>(sizeof(T)));
  }
}

// ------------------------------------------------------------------ perturb_
template <class O, class B, class D>
__attribute__((noinline)) static void perturb_span(O* __restrict__ o, const B* __restrict__ b,
                                                   const D* __restrict__ d, B* __restrict__ bk,
                                                   int64_t n, float s) {
  if (bk) {
    for (int64_t j = 0; j < n; ++j) {
      const B x = b[j];
      bk[j] = x;
      o[j] = from_f<O>(perturb(to_f(x), to_f(d[j]), s));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) o[j] = from_f<O>(perturb(to_f(b[j]), to_f(d[j]), s));
  }
}

// out is base (in-place probe on parameters, backup written first, element by element)
template <class T, class D>
__attribute__((noinline)) static void perturb_inplace_span(T* __restrict__ o, const D* __restrict__ d,
                                                           T* __restrict__ bk, int64_t n, float s) {
  if (bk) {
    for (int64_t j = 0; j < n; ++j) {
      const T x = o[j];
      bk[j] = x;
      o[j] = from_f<T>(perturb(to_f(x), to_f(d[j]), s));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) o[j] = from_f<T>(perturb(to_f(o[j]), to_f(d[j]), s));
  }
}

void k_perturb(const PerturbArgs& a) {
  dispatch(a.to, [&](auto to) {
    using O = decltype(to);
    dispatch(a.tb, [&](auto tb) {
      using B = decltype(tb);
      dispatch(a.td, [&](auto td) {
        using D = decltype(td);
        for_chunks(a.w, [&](int64_t, const Chunk& k) {
          const float s = a.scale;
          const bool nt = kHaveNT && a.w.nt;
          O* o = static_cast<O*>(a.out[k.t]);
          B* b = static_cast<B*>(a.base[k.t]);
          const D* d = static_cast<const D*>(a.dir[k.t]);
          B* bk = a.backup ? static_cast<B*>(a.backup[k.t]) : nullptr;
          alignas(64) O otmp[kBlock];
          alignas(64) B ktmp[kBlock];
          const bool inplace = static_cast<void*>(o) == static_cast<void*>(b);
          for_blocks(k, [&](int64_t b0, int64_t n) {
            B* kd = bk ? (nt ? ktmp : bk + b0) : nullptr;  // the backup is write-only
            if constexpr (std::is_same_v<O, B>) {
              if (inplace) {  // out is read here: regular stores
                perturb_inplace_span(o + b0, d + b0, kd, n, s);
                if (bk && nt) nt_copy(bk + b0, ktmp, n * static_cast<int64_t>(sizeof(B)));
                return;
              }
            }
            perturb_span(nt ? otmp : o + b0, b + b0, d + b0, kd, n, s);
            if (nt) nt_copy(o + b0, otmp, n * static_cast<int64_t>(sizeof(O)));
            if (bk && nt) nt_copy(bk + b0, ktmp, n * static_cast<int64_t>(sizeof(B)));
          });
          if (nt) nt_fence();
        });
      });
    });
  });
}

// ------------------------------------------------------------------ combine_step_
// The math of one block: reads w (masters) and the gradients, updates the state (s1, s2)
// and v in place, writes the new w into `wn` (an L1 buffer); the caller then stores wn
// into masters and/or params. The term flags are template parameters so that the loop
// is straight-line code; the formulas are la_math.h's, fed a Combine whose flags are
// these same compile-time constants.
// PLAIN (SGD only): plain heavy-ball momentum (not the buffer's first step, no Nesterov),
// the common case; the flags are then compile-time constants and their selects fold away
// (in L1/L2-resident calls the selects, not memory, bound the loop).
template <class G, bool ADAM, bool HAS_V, bool R0, bool RP, bool RM, bool S1, bool PLAIN = false>
__attribute__((noinline)) static void combine_span(
    int64_t n, const CombineArgs& a, const float* __restrict__ w, float* __restrict__ wn,
    const G* __restrict__ x0, const G* __restrict__ xp, const G* __restrict__ xm, float* __restrict__ b1,
    float* __restrict__ b2, float* __restrict__ vv) {
  // local copies of every scalar: a load through `a` could alias the stores below
  Combine k = a.k;
  k.u0 = k.u0 && R0;
  k.up = k.up && RP;
  k.um = k.um && RM;
  k.w0 = k.w0 && R0 && HAS_V;
  k.wp = k.wp && RP && HAS_V;
  k.wm = k.wm && RM && HAS_V;
  const AdamW ah = a.adamw;
  Sgd sh = a.sgd;
  if (PLAIN) {
    sh.first = false;
    sh.nesterov = false;
    sh.use_momentum = true;
  }
  const float bv = a.vc[0], a0 = a.vc[1], ap = a.vc[2], am = a.vc[3];
  for (int64_t i = 0; i < n; ++i) {
    const float f0 = R0 ? to_f(x0[i]) : 0.0f;
    const float fp = RP ? to_f(xp[i]) : 0.0f;
    const float fm = RM ? to_f(xm[i]) : 0.0f;
    const float d = direction(k, f0, fp, fm);
    if (HAS_V) vv[i] = momentum_v(k, vv[i], f0, fp, fm, bv, a0, ap, am);
    if (ADAM) {
      wn[i] = adamw(ah, w[i], d, b1 + i, b2 + i);
    } else {
      float buf = S1 ? b1[i] : 0.0f;  // a register: no store to a fixed address
      wn[i] = sgd(sh, w[i], d, &buf);
      if (S1) b1[i] = buf;
    }
  }
}

template <class P, class G, bool ADAM, bool HAS_V, bool R0, bool RP, bool RM, bool S1, bool PLAIN = false>
void combine_typed(const CombineArgs& a) {
  for_chunks(a.w, [&](int64_t c, const Chunk& k) {
    const bool nt = kHaveNT && a.w.nt;
    P* p = static_cast<P*>(a.params[k.t]);
    float* w = a.masters[k.t];
    const G* x0 = R0 ? static_cast<const G*>(a.g0[k.t]) : nullptr;
    const G* xp = RP ? static_cast<const G*>(a.gp[k.t]) : nullptr;
    const G* xm = RM ? static_cast<const G*>(a.gm[k.t]) : nullptr;
    float* b1 = S1 ? a.s1[k.t] : nullptr;
    float* b2 = ADAM ? a.s2[k.t] : nullptr;
    float* vv = HAS_V ? a.v[k.t] : nullptr;
    // params that are the masters themselves (fp32, LookaheadBio): one store, to both
    const bool alias = static_cast<void*>(p) == static_cast<void*>(w);
    const bool write_w = a.write_masters || alias, write_p = !alias;
    alignas(64) float wn[kBlock];
    alignas(64) P ptmp[kBlock];
    double vsq = 0.0;
    for_blocks(k, [&](int64_t b0, int64_t n) {
      combine_span<G, ADAM, HAS_V, R0, RP, RM, S1, PLAIN>(n, a, w + b0, wn, R0 ? x0 + b0 : nullptr, RP ? xp + b0 : nullptr,
                                                   RM ? xm + b0 : nullptr, S1 ? b1 + b0 : nullptr,
                                                   ADAM ? b2 + b0 : nullptr, HAS_V ? vv + b0 : nullptr);
      if (write_w) std::memcpy(w + b0, wn, static_cast<size_t>(n) * 4);
      if (write_p) store_cast(p + b0, wn, n, nt, ptmp);
      // ||v_new||^2 of the block just stored (in L1): multi_dot's lanes and block grid
      if (HAS_V && a.vsq_slot) vsq += dot_block<float, float>(vv, vv, b0, n);
    });
    if (HAS_V && a.vsq_slot) a.vsq_slot[c] = vsq;
    if (nt && write_p) nt_fence();
  });
}

template <class P, class G, bool ADAM, bool HAS_V>
void combine_flags(const CombineArgs& a) {
  const Combine& k = a.k;
  const bool r0 = k.u0 || k.w0, rp = k.up || k.wp, rm = k.um || k.wm, s1 = a.s1 != nullptr;
  // a gradient list is read when either combination uses it; unused ones are never touched
  const int code = (r0 ? 1 : 0) | (rp ? 2 : 0) | (rm ? 4 : 0) | (s1 ? 8 : 0);
  const Sgd& h = a.sgd;
  if (!ADAM && s1 && h.use_momentum && !h.first && !h.nesterov) {
    switch (code & 7) {
#define LA_CASE(n) \
  case n: combine_typed<P, G, ADAM, HAS_V, (n & 1) != 0, (n & 2) != 0, (n & 4) != 0, true, true>(a); return;
      LA_CASE(0) LA_CASE(1) LA_CASE(2) LA_CASE(3) LA_CASE(4) LA_CASE(5) LA_CASE(6) LA_CASE(7)
#undef LA_CASE
    }
  }
  switch (code) {
#define LA_CASE(n) \
  case n: combine_typed<P, G, ADAM, HAS_V, (n & 1) != 0, (n & 2) != 0, (n & 4) != 0, (n & 8) != 0>(a); break;
    LA_CASE(0) LA_CASE(1) LA_CASE(2) LA_CASE(3) LA_CASE(4) LA_CASE(5) LA_CASE(6) LA_CASE(7)
    LA_CASE(8) LA_CASE(9) LA_CASE(10) LA_CASE(11) LA_CASE(12) LA_CASE(13) LA_CASE(14) LA_CASE(15)
#undef LA_CASE
  }
}

void k_combine(const CombineArgs& a) {
  dispatch(a.tp, [&](auto tp) {
    using P = decltype(tp);
    dispatch(a.tg, [&](auto tg) {
      using G = decltype(tg);
      if (a.adam) {
        if (a.v) combine_flags<P, G, true, true>(a);
        else combine_flags<P, G, true, false>(a);
      } else {
        if (a.v) combine_flags<P, G, false, true>(a);
        else combine_flags<P, G, false, false>(a);
      }
    });
  });
}

// ------------------------------------------------------------------ lookahead_sync_
template <class F, class Q>
__attribute__((noinline)) static void sync_span(float* __restrict__ s, F* __restrict__ f, Q* __restrict__ q,
                                                int64_t n, float al) {
  if (q) {
    for (int64_t i = 0; i < n; ++i) {
      const float x = lookahead(s[i], to_f(f[i]), al);
      s[i] = x;
      f[i] = from_f<F>(x);
      q[i] = from_f<Q>(x);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float x = lookahead(s[i], to_f(f[i]), al);
      s[i] = x;
      f[i] = from_f<F>(x);
    }
  }
}

void k_sync(const SyncArgs& a) {
  dispatch(a.tf, [&](auto tf) {
    using F = decltype(tf);
    dispatch(a.tq, [&](auto tq) {
      using Q = decltype(tq);
      for_chunks(a.w, [&](int64_t, const Chunk& c) {
        const bool nt = kHaveNT && a.w.nt && a.params;  // params: written, never read
        float* s = a.slow[c.t];
        F* f = static_cast<F*>(a.fast[c.t]);
        Q* q = a.params ? static_cast<Q*>(a.params[c.t]) : nullptr;
        alignas(64) Q qtmp[kBlock];
        for_blocks(c, [&](int64_t b0, int64_t n) {
          sync_span(s + b0, f + b0, q ? (nt ? qtmp : q + b0) : nullptr, n, a.alpha);
          if (nt) nt_copy(q + b0, qtmp, n * static_cast<int64_t>(sizeof(Q)));
        });
        if (nt) nt_fence();
      });
    });
  });
}

// ------------------------------------------------------------------ nonfinite_
template <class T>
uint8_t nonfinite_range(T* x, int64_t b, int64_t e, bool unscale, float inv) {
  uint32_t flag = 0;  // integer OR: vectorizes, order-free
  if (unscale) {
    for (int64_t i = b; i < e; ++i) {
      const T y = from_f<T>(to_f(x[i]) * inv);
      x[i] = y;
      flag |= finite(to_f(y)) ? 0u : 1u;
    }
  } else {
    for (int64_t i = b; i < e; ++i) flag |= finite(to_f(x[i])) ? 0u : 1u;
  }
  return flag ? 1 : 0;
}

void k_nonfinite(const NonfiniteArgs& a) {
  for_chunks(a.w, [&](int64_t c, const Chunk& k) {
    dispatch(a.types[k.t], [&](auto tt) {
      using T = decltype(tt);
      T* x = static_cast<T*>(a.x[k.t]);
      if (!a.sq_slot) {
        a.bad[c] = nonfinite_range(x, k.b, k.e, a.unscale, a.inv_scale);
        return;
      }
      // check (and unscale) a block, then its squared norm while it is in L1: one read
      uint8_t bad = 0;
      double acc = 0.0;
      for_blocks(k, [&](int64_t b0, int64_t n) {
        bad |= nonfinite_range(x, b0, b0 + n, a.unscale, a.inv_scale);
        acc += dot_block<T, T>(x, x, b0, n);
      });
      a.bad[c] = bad;
      a.sq_slot[c] = acc;
    });
  });
}

}  // namespace LA_ISA
}  // namespace cpu
}  // namespace la
