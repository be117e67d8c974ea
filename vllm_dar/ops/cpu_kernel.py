"""A C++ DAR attention kernel for the CPU (decodes and prefill chunks in one call), built on first use with
``torch.utils.cpp_extension.load_inline`` (g++ and ninja; ~1 min once, then cached in ~/.cache/torch_extensions).

Why C++ (measured, see ``vllm_dar.ops.batched``'s docstring): a decode step of a 30-layer model calls attention
30 times; the vectorised PyTorch decode runs ~40 ATen ops per call (0.3-0.6 ms of dispatch for one request,
where stock vLLM's C++ kernel takes 25 us), its reduced-width matmuls are tiny-M GEMMs ([hpg x rk] x [rk x B])
that MKL runs far below memory bandwidth, and its prefill allocates multi-MB score tiles. ``torch.compile`` of the
same math measured no better (0.5 ms at batch 1, 35-65 s to compile per shape, recompiles on batch size).

The kernel reads the paged caches in place (no gather copy). One work item = (request, projection group, tile
of queries); its rows are (query, head of the group) pairs, so every far block is loaded once for all of them
(GQA without expanding K/V, and prefill queries share the block reads):

* full width (``{s <= t: t - s < w or s < S}``): cached sinks and window history from the window cache, the
  chunk's own positions from the fresh ``key``/``value``; row-wise dot products at width D;
* reduced width (``[S, t - w]``): per far block, scores ``(q Q_h) . k~`` for every row from 16 x 16 tiles of
  (position, rank) transposed in registers (AVX-512, ranks a multiple of 16; a scalar transpose otherwise), one
  online-softmax rescale per block and row, values accumulated at width ``rv``; projected up by ``U_h`` once
  per row at the end. fp32 far rows are read in place; the next far block is prefetched into L2. Decode at
  long context is bound by this stream: per layer at 16 x 4K (fp32, 2 threads, 16-token window pages) the
  register transpose and the L2 prefetch took it from 2.3 to 1.1 ms (ad hoc same-run comparison; the engine
  figures are ``benchmarks/throughput.py``'s);
* bf16 caches are widened to fp32 on load; all arithmetic is fp32; output in the query dtype.

``write`` is the layer's cache write in the same extension: per token, the full-width K/V into its window slot
and ``k_g K_g | v_g V_g`` (fp32 sums) into its far slot. Both functions take caches whose blocks are dense but
may sit apart (vLLM pads pages of per-layer ranks): blocks are addressed through ``stride(0)``.

Semantics are the contract's (``vllm_dar.ops.paged``); tests: ``tests/engine/test_batched_ops.py``.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

ROWS_PER_ITEM = 48  # (query, head) rows per work item: 16 queries x 3 heads per group (per-head SmolLM2)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <immintrin.h>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

template <typename T> static inline float f32(T x) { return static_cast<float>(x); }

// exp(x) for x <= 0: 2^(x log2 e) split into an exponent and a degree-6 polynomial for 2^f on [0, 1) (relative
// error ~2e-7, below fp32 attention's summation noise). GCC 12 does not vectorise std::exp nor a scalar version
// of this (the float bit-cast blocks it), so the AVX-512 loop below is written out; other CPUs use std::exp.
// x[i] = exp(x[i] - shift) for i < n, where every x[i] <= shift; returns the sum of the results.
static inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  const __m512 vs = _mm512_set1_ps(shift), lo = _mm512_set1_ps(-87.f), l2e = _mm512_set1_ps(1.44269504088896341f);
  __m512 acc = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_sub_ps(v, vs), lo), l2e);
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    const __m512 e = _mm512_scalef_ps(p, fi);  // p * 2^fi
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
  }
  sum = _mm512_reduce_add_ps(acc);
#else
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
#endif
  return sum;
}

// max(init, x[0..n)) (the omp simd max reduction stays scalar without -ffast-math).
static inline float max_of(const float* x, int64_t n, float init) {
  int64_t i = 0;
  float mx = init;
#ifdef __AVX512F__
  __m512 vm = _mm512_set1_ps(init);
  for (; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    vm = _mm512_mask_max_ps(vm, k, vm, _mm512_maskz_loadu_ps(k, x + i));
  }
  mx = _mm512_reduce_max_ps(vm);
#else
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
#endif
  return mx;
}

// acc[0..rv) += sum_x e[x] * v[x * ld + c]: four independent accumulator chains (one chain waits on the FMA
// latency at every position: perf showed the loop at 12% of decode time), summed at the end. RV: compile-time
// rank (0: runtime rv, chains in the scratch ``tmp`` [4 * rv]).
template <int RV>
static inline void accumulate(float* acc, const float* e, const float* v, int64_t n, int64_t ld, int64_t rv,
                              float* tmp) {
  constexpr int64_t NR = RV ? RV : 1;
  float r0[NR], r1[NR], r2[NR], r3[NR];
  float *a0 = RV ? r0 : tmp, *a1 = RV ? r1 : tmp + rv, *a2 = RV ? r2 : tmp + 2 * rv, *a3 = RV ? r3 : tmp + 3 * rv;
  const int64_t m = RV ? RV : rv;
  for (int64_t c = 0; c < m; ++c) { a0[c] = acc[c]; a1[c] = 0.f; a2[c] = 0.f; a3[c] = 0.f; }
  int64_t x = 0;
  for (; x + 4 <= n; x += 4) {
    const float e0 = e[x], e1 = e[x + 1], e2 = e[x + 2], e3 = e[x + 3];
    const float* v0 = v + x * ld;
#pragma omp simd
    for (int64_t c = 0; c < m; ++c) {
      a0[c] += e0 * v0[c];
      a1[c] += e1 * v0[ld + c];
      a2[c] += e2 * v0[2 * ld + c];
      a3[c] += e3 * v0[3 * ld + c];
    }
  }
  for (; x < n; ++x) {
    const float ex = e[x];
    const float* vx = v + x * ld;
#pragma omp simd
    for (int64_t c = 0; c < m; ++c) a0[c] += ex * vx[c];
  }
  for (int64_t c = 0; c < m; ++c) acc[c] = (a0[c] + a1[c]) + (a2[c] + a3[c]);
}

// Rows are token-major: q [T, H, D] (token stride q_st), k/v [T, J, D] (kv_st), out [T, H, D] (out_st).
// wcache [NBw, J, Bw, 2D] (block stride wbs) + wtable [R, mw]; fcache [NBf, G, Bf, rk + rv] (block stride fbs)
// + ftable [R, mf]: each block dense, blocks possibly padded (vLLM pads pages of per-layer ranks); qsl [R + 1],
// lens [R];
// q_proj [H, D, rk], v_up [H, rv, D] fp32.
template <typename T> struct Args {
  const T *q, *k, *v;
  T* out;
  int64_t q_st, kv_st, out_st;
  const T* wcache;
  const int64_t* wtable;
  int64_t mw, wbs;
  const T* fcache;
  const int64_t* ftable;
  int64_t mf, fbs;
  const int64_t *qsl, *lens;
  const float *q_proj, *v_up;
  int64_t H, J, G, D, rk, rv, Bw, Bf, window, sinks;
  float scale;
};

struct Scratch {
  std::vector<float> qf, qr, m, l, acc_f, acc_r, sc, fs, kt, rows, acc4;
  std::vector<int64_t> lo;
  std::vector<const void*> kp, vp;
};

// One work item: request r, projection group g, queries q0 .. q0 + qn - 1 of its chunk; a row is (query, head).
// Dot product at full width: 16 lane-wise partial sums, then a tree (GCC's own reduction epilogue spilled).
template <typename T, int HD>
static inline float dot_full(const float* q, const T* k, int64_t n) {
  if (HD == 0 || HD % 16 != 0) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += q[d] * f32(k[d]);
    return s;
  }
  float part[16] = {0.f};
  for (int64_t d0 = 0; d0 < HD; d0 += 16)
#pragma omp simd
    for (int l = 0; l < 16; ++l) part[l] += q[d0 + l] * f32(k[d0 + l]);
  for (int w = 8; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

#ifdef __AVX512F__
// r[0..16) = the transpose of the 16 x 16 tile r[0..16) (row i, lane j -> row j, lane i).
static inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[i + h]), b = _mm512_castps_pd(t[i + 2 + h]);
      r[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + 4 + k], 0x88);
      t[i + 4 + k] = _mm512_shuffle_f32x4(r[i + k], r[i + 4 + k], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
  }
}
#endif

// The far block's scores for every row: sc[row * lds + x] = qr[row] . rows[x, :rk] for x < ns (positions past ns
// may be written, up to lds). AVX-512 with rk % 16 == 0: 16 positions x 16 ranks are loaded and transposed in
// registers, then each row's 16 scores are 16 broadcast FMAs (the scalar transpose through kt that this replaces
// was 2 x rk scalar moves per position). Otherwise: transpose through kt [rk, ldk], vectorise over positions.
static inline void far_scores(const float* rows, int64_t ld, int64_t ns, int64_t rk, const float* qr, int64_t nrow,
                              float* sc, int64_t lds, float* kt, int64_t ldk) {
#ifdef __AVX512F__
  if (rk % 16 == 0) {
    for (int64_t x0 = 0; x0 < ns; x0 += 16) {
      const int64_t n = std::min<int64_t>(16, ns - x0);
      for (int64_t c0 = 0; c0 < rk; c0 += 16) {
        __m512 col[16];
        for (int64_t i = 0; i < 16; ++i)
          col[i] = i < n ? _mm512_loadu_ps(rows + (x0 + i) * ld + c0) : _mm512_setzero_ps();
        transpose16(col);
        for (int64_t row = 0; row < nrow; ++row) {
          const float* q = qr + row * rk + c0;
          float* s = sc + row * lds + x0;
          __m512 s0 = c0 ? _mm512_loadu_ps(s) : _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
          for (int i = 0; i < 16; i += 2) {
            s0 = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), col[i], s0);
            s1 = _mm512_fmadd_ps(_mm512_set1_ps(q[i + 1]), col[i + 1], s1);
          }
          _mm512_storeu_ps(s, _mm512_add_ps(s0, s1));
        }
      }
    }
    return;
  }
#endif
  for (int64_t x = 0; x < ns; ++x)
    for (int64_t c = 0; c < rk; ++c) kt[c * ldk + x] = rows[x * ld + c];
  for (int64_t row = 0; row < nrow; ++row) {
    float* si = sc + row * lds;
    const float* q = qr + row * rk;
#pragma omp simd
    for (int64_t x = 0; x < ns; ++x) {  // vectorised over positions, the rank sum stays in a register
      float s = 0.f;
      for (int64_t c = 0; c < rk; ++c) s += q[c] * kt[c * ldk + x];
      si[x] = s;
    }
  }
}

// RK / RV / HD: ranks and head_dim as compile-time constants (0: read from Args), so the loops over them unroll
// and their accumulators stay in registers.
template <typename T, int RK, int RV, int HD>
static void run_item(const Args<T>& a, int64_t r, int64_t g, int64_t q0, int64_t qn, Scratch& w) {
  const int64_t rk = RK ? RK : a.rk, rv = RV ? RV : a.rv, D = HD ? HD : a.D;
  const int64_t hpg = a.H / a.G, rep = a.H / a.J, C = rk + rv, Bf = a.Bf;
  const int64_t nrow = qn * hpg, ldk = Bf + 16;  // transposed-key stride: not 2^k (L1 set conflicts)
  const int64_t lds = (Bf + 15) / 16 * 16;         // score row stride: whole 16-wide stores
  const int64_t L = a.lens[r], tok0 = a.qsl[r] + q0, c0 = L - (a.qsl[r + 1] - a.qsl[r]);
  w.qf.resize(nrow * D); w.qr.resize(nrow * rk); w.m.resize(nrow); w.l.resize(nrow); w.lo.resize(nrow);
  w.acc_f.assign(nrow * D, 0.f); w.acc_r.assign(nrow * rv, 0.f); w.sc.resize(nrow * lds);
  w.kt.resize(rk * ldk); w.rows.resize(Bf * C); w.acc4.resize(4 * rv);
  const int64_t nfull = a.sinks + std::max<int64_t>(a.window, 1) + 1;
  w.fs.resize(nfull); w.kp.resize(nfull); w.vp.resize(nfull);
  int64_t max_lo = 0;
  for (int64_t row = 0; row < nrow; ++row) {
    const int64_t qi = row / hpg, h = g * hpg + row % hpg, t = c0 + q0 + qi;
    const T* qrow = a.q + (tok0 + qi) * a.q_st + h * D;
    float* qf = w.qf.data() + row * D;
    float* qr = w.qr.data() + row * rk;
    for (int64_t d = 0; d < D; ++d) qf[d] = f32(qrow[d]) * a.scale;
    for (int64_t c = 0; c < rk; ++c) qr[c] = 0.f;
    const float* P = a.q_proj + h * D * rk;
    for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
      for (int64_t c = 0; c < rk; ++c) qr[c] += qf[d] * P[d * rk + c];
    }
    // Full width: {s <= t : t - s < w or s < S}. lo = first window position; the reduced ones are [S, lo).
    const int64_t lo = std::max<int64_t>(0, t - a.window + 1);
    w.lo[row] = lo;
    max_lo = std::max(max_lo, lo);
    const int64_t j = h / rep;
    int64_t n = 0;
    auto cached = [&](int64_t p) {
      const T* kr = a.wcache + a.wtable[r * a.mw + p / a.Bw] * a.wbs + (j * a.Bw + p % a.Bw) * 2 * D;
      w.kp[n] = kr; w.vp[n++] = kr + D;
    };
    auto fresh = [&](int64_t p) {
      const int64_t tk = a.qsl[r] + (p - c0);
      w.kp[n] = a.k + tk * a.kv_st + j * D; w.vp[n++] = a.v + tk * a.kv_st + j * D;
    };
    for (int64_t p = 0; p < std::min(std::min(a.sinks, lo), c0); ++p) cached(p);  // cached sinks
    for (int64_t p = lo; p < c0; ++p) cached(p);                                   // cached window
    for (int64_t p = c0; p < std::min(a.sinks, lo); ++p) fresh(p);                  // sinks in the chunk
    for (int64_t p = std::max(c0, lo); p <= t; ++p) fresh(p);                      // window in the chunk
    float mx = -INFINITY;
    for (int64_t x = 0; x < n; ++x) {
      const float s = dot_full<T, HD>(qf, static_cast<const T*>(w.kp[x]), D);
      w.fs[x] = s;
      mx = s > mx ? s : mx;
    }
    float* fs = w.fs.data();
    const float sum = n ? exp_shifted(fs, n, mx) : 0.f;
    float* acc = w.acc_f.data() + row * D;
    for (int64_t x = 0; x < n; ++x) {
      const float e = fs[x];
      const T* vr = static_cast<const T*>(w.vp[x]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += e * f32(vr[d]);
    }
    w.m[row] = mx;
    w.l[row] = sum;
  }
  // Reduced width: positions [S, lo) per row, far block by far block; one rescale per block and row.
  for (int64_t b = a.sinks / Bf; b * Bf < max_lo; ++b) {
    const int64_t s0 = std::max(a.sinks, b * Bf), s1 = std::min(max_lo, (b + 1) * Bf), ns = s1 - s0;
    if (ns <= 0) continue;
    // The block's rows [ns, C]: read in place when fp32, widened into scratch when bf16.
    const T* src = a.fcache + a.ftable[r * a.mf + b] * a.fbs + (g * Bf + s0 % Bf) * C;
    // The next block's rows, while this one computes (block ids jump, so the hardware prefetcher cannot), into
    // L2 (prefetcht2): prefetching into L1 stalled on the line-fill buffers (see the module docstring).
    if ((b + 1) * Bf < max_lo) {
      const char* nx = reinterpret_cast<const char*>(a.fcache + a.ftable[r * a.mf + b + 1] * a.fbs + g * Bf * C);
      const int64_t bytes = std::min(Bf, max_lo - (b + 1) * Bf) * C * static_cast<int64_t>(sizeof(T));
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(nx + o, 0, 1);
    }
    const float* rows = w.rows.data();  // [ns, C] fp32: the cache rows themselves when it is fp32
    if constexpr (std::is_same<T, float>::value) {
      rows = src;
    } else {
#pragma omp simd
      for (int64_t e = 0; e < ns * C; ++e) w.rows[e] = f32(src[e]);
    }
    far_scores(rows, C, ns, rk, w.qr.data(), nrow, w.sc.data(), lds, w.kt.data(), ldk);
    for (int64_t row = 0; row < nrow; ++row) {
      const int64_t nv = std::min(ns, w.lo[row] - s0);  // visible prefix of this block
      if (nv <= 0) continue;
      float* si = w.sc.data() + row * lds;
      const float mx = max_of(si, nv, w.m[row]);
      if (mx > w.m[row]) {
        const float f = std::exp(w.m[row] - mx);
        w.l[row] *= f;
        for (int64_t d = 0; d < D; ++d) w.acc_f[row * D + d] *= f;
        for (int64_t c = 0; c < rv; ++c) w.acc_r[row * rv + c] *= f;
        w.m[row] = mx;
      }
      w.l[row] += exp_shifted(si, nv, mx);
      accumulate<RV>(w.acc_r.data() + row * rv, si, rows + rk, nv, C, rv, w.acc4.data());
    }
  }
  // Project the reduced accumulator up once per row, normalise, store.
  for (int64_t row = 0; row < nrow; ++row) {
    const int64_t qi = row / hpg, h = g * hpg + row % hpg;
    float* acc = w.acc_f.data() + row * D;
    const float* U = a.v_up + h * rv * D;
    for (int64_t c = 0; c < rv; ++c) {
      const float x = w.acc_r[row * rv + c];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += x * U[c * D + d];
    }
    const float inv = 1.f / w.l[row];
    T* o = a.out + (tok0 + qi) * a.out_st + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
  }
}

void dar_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor qsl,
                   torch::Tensor lens, torch::Tensor wcache, torch::Tensor wtable, torch::Tensor fcache,
                   torch::Tensor ftable, torch::Tensor q_proj, torch::Tensor v_up, int64_t window, int64_t sinks,
                   double scale, int64_t rows_per_item) {
  const int64_t R = lens.size(0), G = fcache.size(1), hpg = q.size(1) / G;
  const int64_t* qs = qsl.data_ptr<int64_t>();
  const int64_t qt = std::max<int64_t>(1, rows_per_item / hpg);  // queries per work item
  std::vector<std::array<int64_t, 4>> items;  // (request, group, first query, queries)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t q0 = 0; q0 < qs[r + 1] - qs[r]; q0 += qt)
      for (int64_t g = 0; g < G; ++g) items.push_back({r, g, q0, std::min(qt, qs[r + 1] - qs[r] - q0)});
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    Args<scalar_t> a{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                     out.data_ptr<scalar_t>(), q.stride(0), k.stride(0), out.stride(0),
                     wcache.data_ptr<scalar_t>(), wtable.data_ptr<int64_t>(), wtable.stride(0), wcache.stride(0),
                     fcache.data_ptr<scalar_t>(), ftable.data_ptr<int64_t>(), ftable.stride(0), fcache.stride(0), qs,
                     lens.data_ptr<int64_t>(), q_proj.data_ptr<float>(), v_up.data_ptr<float>(), q.size(1),
                     k.size(1), G, q.size(2), q_proj.size(2), v_up.size(1), wcache.size(2), fcache.size(2), window,
                     sinks, static_cast<float>(scale)};
    const bool r16 = a.rk == 16 && a.rv == 16 && a.D == 64;  // SmolLM2 / Llama-style DAR defaults
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      Scratch w;
      for (int64_t i = begin; i < end; ++i) {
        const auto& it = items[i];
        if (r16)
          run_item<scalar_t, 16, 16, 64>(a, it[0], it[1], it[2], it[3], w);
        else
          run_item<scalar_t, 0, 0, 0>(a, it[0], it[1], it[2], it[3], w);
      }
    });
  };
  if (q.scalar_type() == at::kFloat)
    run(float{});
  else if (q.scalar_type() == at::kBFloat16)
    run(at::BFloat16{});
  else
    TORCH_CHECK(false, "dar_attention: fp32 or bf16 only, got ", q.scalar_type());
}

// The cache write of one layer: token t's K/V [J, D] full width into window slot wslots[t], and its reduced
// K/V (the J / G heads of each group concatenated, times k_down [G, Dg, rk] / v_down [G, Dg, rv], in fp32)
// into far slot fslots[t]. Slots below one block (vLLM's null block 0, or -1) are skipped, as in
// vllm_dar.ops.paged.write_slots. Caches: dense blocks, block stride stride(0).
template <typename T>
static void write_token(const T* k, const T* v, int64_t ws, int64_t fs, T* wcache, int64_t wbs, int64_t Bw,
                        T* fcache, int64_t fbs, int64_t Bf, const float* kd, const float* vd, int64_t J,
                        int64_t D, int64_t G, int64_t rk, int64_t rv, float* xf, float* red) {
  if (ws >= Bw) {
    T* dst = wcache + (ws / Bw) * wbs + (ws % Bw) * 2 * D;
    for (int64_t j = 0; j < J; ++j, dst += Bw * 2 * D) {
      std::memcpy(dst, k + j * D, D * sizeof(T));
      std::memcpy(dst + D, v + j * D, D * sizeof(T));
    }
  }
  if (fs < Bf) return;
  const int64_t Dg = J / G * D, C = rk + rv;
  T* dst = fcache + (fs / Bf) * fbs + (fs % Bf) * C;
  for (int64_t g = 0; g < G; ++g, dst += Bf * C) {
    for (int64_t half = 0; half < 2; ++half) {
      const T* x = (half ? v : k) + g * Dg;
      const float* P = (half ? vd : kd) + g * Dg * (half ? rv : rk);
      const int64_t r = half ? rv : rk;
      for (int64_t i = 0; i < Dg; ++i) xf[i] = f32(x[i]);
      for (int64_t c = 0; c < r; ++c) red[c] = 0.f;
      for (int64_t i = 0; i < Dg; ++i) {
        const float xi = xf[i];
#pragma omp simd
        for (int64_t c = 0; c < r; ++c) red[c] += xi * P[i * r + c];
      }
      T* o = dst + (half ? rk : 0);
      for (int64_t c = 0; c < r; ++c) o[c] = static_cast<T>(red[c]);
    }
  }
}

void dar_write(torch::Tensor k, torch::Tensor v, torch::Tensor wcache, torch::Tensor wslots, torch::Tensor fcache,
               torch::Tensor fslots, torch::Tensor k_down, torch::Tensor v_down) {
  const int64_t T_ = k.size(0), J = k.size(1), D = k.size(2), G = k_down.size(0), rk = k_down.size(2),
                rv = v_down.size(2), Bw = wcache.size(2), Bf = fcache.size(2);
  const int64_t* wsl = wslots.data_ptr<int64_t>();
  const int64_t* fsl = fslots.data_ptr<int64_t>();
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const int64_t kst = k.stride(0), vst = v.stride(0);
    scalar_t *wc = wcache.data_ptr<scalar_t>(), *fc = fcache.data_ptr<scalar_t>();
    const float *kd = k_down.data_ptr<float>(), *vd = v_down.data_ptr<float>();
    at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(J * D), red(std::max(rk, rv));
      for (int64_t t = begin; t < end; ++t)
        write_token<scalar_t>(kp + t * kst, vp + t * vst, wsl[t], fsl[t], wc, wcache.stride(0), Bw, fc,
                              fcache.stride(0), Bf, kd, vd, J, D, G, rk, rv, xf.data(), red.data());
    });
  };
  if (k.scalar_type() == at::kFloat)
    run(float{});
  else if (k.scalar_type() == at::kBFloat16)
    run(at::BFloat16{});
  else
    TORCH_CHECK(false, "dar_write: fp32 or bf16 only, got ", k.scalar_type());
}
"""

_CPP_DECL = (("void dar_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, "
              "torch::Tensor qsl, torch::Tensor lens, torch::Tensor wcache, torch::Tensor wtable, "
              "torch::Tensor fcache, torch::Tensor ftable, torch::Tensor q_proj, torch::Tensor v_up, "
              "int64_t window, int64_t sinks, double scale, int64_t rows_per_item);"),
             ("void dar_write(torch::Tensor k, torch::Tensor v, torch::Tensor wcache, torch::Tensor wslots, "
              "torch::Tensor fcache, torch::Tensor fslots, torch::Tensor k_down, torch::Tensor v_down);"))


@functools.cache
def kernel():
    """The compiled extension module, or None when it cannot be built (no compiler) or ``VLLM_DAR_CPU_KERNEL=0``."""
    if os.environ.get("VLLM_DAR_CPU_KERNEL", "1") == "0":
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(name="vllm_dar_cpu_attention", cpp_sources=[*_CPP_DECL, _SOURCE],
                           functions=["dar_attention", "dar_write"], verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                           extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        logging.getLogger(__name__).warning("vllm-dar: C++ attention kernel unavailable (%s); using PyTorch", e)
        return None


def dense_blocks(cache: Tensor) -> bool:
    """A [blocks, heads, block_size, width] cache whose every block is dense; the block stride may exceed a
    block's size (padded pages), which the kernel takes as ``stride(0)``."""
    _, h, b, c = cache.shape
    return cache.stride()[1:] == (b * c, c, 1) and cache.stride(0) >= h * b * c


def attention(query: Tensor, key: Tensor, value: Tensor, output: Tensor, *, window_cache: Tensor,
              window_table: Tensor, far_cache: Tensor, far_table: Tensor, query_start_loc: list[int],
              seq_lens: list[int], q_proj: Tensor, v_up: Tensor, window: int, sink_tokens: int,
              scale: float) -> None:
    """The whole batch in one kernel call (the contract of ``vllm_dar.ops.paged.dar_paged_attention``).

    q_proj [H, D, rk] and v_up [H, rv, D] fp32 (``PagedProjections``); output rows [heads, head_dim] contiguous
    (any token stride; query/key/value are copied only if theirs are not); caches in the query dtype, each block
    dense (``dense_blocks``; blocks may be padded apart, as vLLM lays out pages of per-layer ranks);
    block tables int32 or int64.
    """
    dt = query.dtype
    for name, x in (("key", key), ("value", value), ("output", output), ("window_cache", window_cache),
                    ("far_cache", far_cache)):
        if x.dtype != dt:
            raise TypeError(f"dar cpu kernel: {name} is {x.dtype}, query is {dt}")
    rows_ok = lambda x: x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]
    if not rows_ok(output):
        raise ValueError("dar cpu kernel: output rows must be contiguous [heads, head_dim]")
    if not rows_ok(query):
        query = query.contiguous()
    if not (rows_ok(key) and rows_ok(value) and key.stride(0) == value.stride(0)):
        key, value = key.contiguous(), value.contiguous()  # the kernel takes one token stride for both
    if not (dense_blocks(window_cache) and dense_blocks(far_cache)):
        raise ValueError("dar cpu kernel: each cache block must be dense [heads, block_size, width]")
    if q_proj.dtype != torch.float32 or v_up.dtype != torch.float32:
        raise TypeError("dar cpu kernel: projections must be fp32")
    kernel().dar_attention(query, key, value, output, torch.tensor(query_start_loc), torch.tensor(seq_lens),
                           window_cache, window_table.long().contiguous(), far_cache,
                           far_table.long().contiguous(), q_proj.contiguous(), v_up.contiguous(), window,
                           sink_tokens, scale, ROWS_PER_ITEM)


def write(key: Tensor, value: Tensor, *, window_cache: Tensor, window_slots: Tensor, far_cache: Tensor,
          far_slots: Tensor, k_down: Tensor, v_down: Tensor) -> None:
    """One layer's cache write in one call (``vllm_dar.ops.paged.write_slots`` of the full-width K/V into the
    window cache and of ``reduce_tokens`` into the far cache, the same semantics; reduction in fp32).

    key, value: [T, J, D] in the caches' dtype, each token's [J, D] contiguous; slots [T] (int32 or int64);
    k_down [G, Dg, rk], v_down [G, Dg, rv] fp32; caches with dense blocks (``dense_blocks``).
    """
    for name, x in (("value", value), ("window_cache", window_cache), ("far_cache", far_cache)):
        if x.dtype != key.dtype:
            raise TypeError(f"dar cpu kernel: {name} is {x.dtype}, key is {key.dtype}")
    rows_ok = lambda x: x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]
    if not (rows_ok(key) and rows_ok(value)):
        key, value = key.contiguous(), value.contiguous()
    if not (dense_blocks(window_cache) and dense_blocks(far_cache)):
        raise ValueError("dar cpu kernel: each cache block must be dense [heads, block_size, width]")
    kernel().dar_write(key, value, window_cache, window_slots.long(), far_cache, far_slots.long(),
                       k_down.float().contiguous(), v_down.float().contiguous())
