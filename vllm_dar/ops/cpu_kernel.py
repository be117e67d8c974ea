"""A C++ DAR decode kernel for the CPU, built on first use with ``torch.utils.cpp_extension.load_inline``.

Why C++: a decode step of a 30-layer model calls attention 30 times; the vectorised PyTorch decode
(``vllm_dar.ops.batched.decode_attention``) runs ~40 ATen ops per call, 0.3-0.6 ms of dispatch for one request,
where stock vLLM's C++ kernel takes 25 us; and its reduced-width matmuls are tiny-M GEMMs ([hpg x rk] x
[rk x B]) that MKL runs at a fraction of memory bandwidth. ``torch.compile`` of the same math measured no
better (0.5 ms at batch 1, 35-65 s to compile per shape, recompiles on batch size; see ``batched``'s docstring).

The kernel reads the paged caches in place (no gather copy), one work item per (request, projection group):

* full width: sinks and window history from the window cache, the fresh token from ``k_new``/``v_new``;
* reduced width: for each far block, scores ``(q Q_h) . k~`` for the group's ``hpg`` heads (k~ read once for
  all of them: GQA without expansion), one rescale per block (online softmax), values accumulated at width
  ``rv``; the reduced accumulator is projected up by ``U_h`` once per head at the end;
* bf16 caches are widened to fp32 on load; all arithmetic is fp32.

Semantics are the contract's (``vllm_dar.ops.paged``); tests: ``tests/engine/test_batched_ops.py``.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

template <typename T> static inline float f32(T x) { return static_cast<float>(x); }

// exp(x) for x <= 0 without libm, so loops over positions vectorise: 2^(x log2 e) split into an exponent and a
// degree-6 polynomial for 2^f on [0, 1) (relative error ~2e-7, below fp32 attention's summation noise).
static inline float exp_nonpos(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;
  const float fi = std::floor(t), f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float sc;
  std::memcpy(&sc, &bits, sizeof sc);
  return p * sc;
}

// Decode attention, one query per request; see vllm_dar/ops/cpu_decode.py.
// q [T, H, D] (token stride q_st), k_new / v_new [T, J, D] (kv_st), out [T, H, D] (out_st): rows tok[r].
// wcache [NBw, J, Bw, 2D], wtable [R, Mw]; fcache [NBf, G, Bf, rk + rv], ftable [R, Mf]; lens [R].
// q_proj [H, D, rk], v_up [H, rv, D] fp32.
template <typename T>
static void decode_impl(const T* q, int64_t q_st, const T* k_new, const T* v_new, int64_t kv_st, T* out,
                        int64_t out_st, const int64_t* tok, const T* wcache, const int64_t* wtable, int64_t mw,
                        const T* fcache, const int64_t* ftable, int64_t mf, const int64_t* lens,
                        const float* q_proj, const float* v_up, int64_t R, int64_t H, int64_t J, int64_t G,
                        int64_t D, int64_t rk, int64_t rv, int64_t Bw, int64_t Bf, int64_t window, int64_t sinks,
                        float scale) {
  const int64_t hpg = H / G, rep = H / J, C = rk + rv;
  const int64_t nwin = sinks + std::max<int64_t>(window - 1, 0) + 1;  // full-width positions at most
  const int64_t ldk = Bf + 16;  // transposed-key row stride: not a power of two (L1 set conflicts at 2^k)
  at::parallel_for(0, R * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hpg * D), qr(hpg * rk), sc(hpg * std::max<int64_t>(Bf, nwin)), kv(std::max(C, 2 * D));
    std::vector<float> acc_f(hpg * D), acc_r(hpg * rv), m(hpg), l(hpg), kt(rk * ldk), rows(Bf * C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / G, g = item % G, h0 = g * hpg;
      const int64_t L = lens[r], t = L - 1;
      const T* qrow = q + tok[r] * q_st;
      for (int64_t i = 0; i < hpg; ++i) {
        for (int64_t d = 0; d < D; ++d) qf[i * D + d] = f32(qrow[(h0 + i) * D + d]) * scale;
        const float* P = q_proj + (h0 + i) * D * rk;
        for (int64_t c = 0; c < rk; ++c) qr[i * rk + c] = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float x = qf[i * D + d];
#pragma omp simd
          for (int64_t c = 0; c < rk; ++c) qr[i * rk + c] += x * P[d * rk + c];
        }
      }
      // Full width: cached sinks p < min(S, t - w + 1, t), cached window [max(0, t - w + 1), t), the token.
      const int64_t lo = std::max<int64_t>(0, t - window + 1);
      const int64_t n_sink = std::min(std::min(sinks, lo), t);
      const int64_t n_hist = n_sink + std::max<int64_t>(0, t - lo);
      const int64_t n = n_hist + ((window >= 1 || t < sinks) ? 1 : 0);
      auto full_row = [&](int64_t x, int64_t j) -> const T* {  // K row of full position x (V follows at +D)
        const int64_t p = x < n_sink ? x : lo + (x - n_sink);
        return wcache + ((wtable[r * mw + p / Bw] * J + j) * Bw + p % Bw) * 2 * D;
      };
      for (int64_t i = 0; i < hpg; ++i) {
        const int64_t j = (h0 + i) / rep;
        const T* kcur = k_new + tok[r] * kv_st + j * D;
        const T* vcur = v_new + tok[r] * kv_st + j * D;
        float mx = -INFINITY;
        for (int64_t x = 0; x < n; ++x) {
          const T* k = x < n_hist ? full_row(x, j) : kcur;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qf[i * D + d] * f32(k[d]);
          sc[i * nwin + x] = s;
          mx = std::max(mx, s);
        }
        m[i] = mx;
        float sum = 0.f;
        for (int64_t d = 0; d < D; ++d) acc_f[i * D + d] = 0.f;
        for (int64_t c = 0; c < rv; ++c) acc_r[i * rv + c] = 0.f;
        for (int64_t x = 0; x < n; ++x) {
          const float e = std::exp(sc[i * nwin + x] - mx);
          sum += e;
          const T* v = x < n_hist ? full_row(x, j) + D : vcur;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc_f[i * D + d] += e * f32(v[d]);
        }
        l[i] = sum;
      }
      // Reduced width: positions [S, L - w), block by block, one rescale per block and head.
      const int64_t n_red = std::max<int64_t>(0, L - window);
      for (int64_t b = sinks / Bf; b * Bf < n_red; ++b) {
        const int64_t s0 = std::max(sinks, b * Bf), s1 = std::min(n_red, (b + 1) * Bf);
        if (s0 >= s1) continue;
        const T* blk = fcache + (ftable[r * mf + b] * G + g) * Bf * C;
        const int64_t ns = s1 - s0;
        // Stream the block's rows into fp32 [ns, C] (contiguous, vector loads: many misses in flight), then
        // transpose the keys to [rk, ns] in L1 so that score loops run over positions.
        const T* src = blk + (s0 % Bf) * C;
#pragma omp simd
        for (int64_t e = 0; e < ns * C; ++e) rows[e] = f32(src[e]);
        for (int64_t x = 0; x < ns; ++x)
          for (int64_t c = 0; c < rk; ++c) kt[c * ldk + x] = rows[x * C + c];
        for (int64_t i = 0; i < hpg; ++i) {
          float* si = sc.data() + i * Bf;
          for (int64_t x = 0; x < ns; ++x) si[x] = 0.f;
          for (int64_t c = 0; c < rk; ++c) {
            const float qc = qr[i * rk + c];
            const float* kc = kt.data() + c * ldk;
#pragma omp simd
            for (int64_t x = 0; x < ns; ++x) si[x] += qc * kc[x];
          }
          float mx = m[i];
#pragma omp simd reduction(max : mx)
          for (int64_t x = 0; x < ns; ++x) mx = std::max(mx, si[x]);
          if (mx > m[i]) {
            const float f = std::exp(m[i] - mx);
            l[i] *= f;
            for (int64_t d = 0; d < D; ++d) acc_f[i * D + d] *= f;
            for (int64_t c = 0; c < rv; ++c) acc_r[i * rv + c] *= f;
            m[i] = mx;
          }
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t x = 0; x < ns; ++x) {
            si[x] = exp_nonpos(si[x] - mx);
            sum += si[x];
          }
          l[i] += sum;
        }
        for (int64_t x = 0; x < ns; ++x) {
          const float* v = rows.data() + x * C + rk;
          for (int64_t i = 0; i < hpg; ++i) {
            const float e = sc[i * Bf + x];
#pragma omp simd
            for (int64_t c = 0; c < rv; ++c) acc_r[i * rv + c] += e * v[c];
          }
        }
      }
      // Project the reduced accumulator up once per head, normalise, store.
      for (int64_t i = 0; i < hpg; ++i) {
        const float* U = v_up + (h0 + i) * rv * D;
        for (int64_t c = 0; c < rv; ++c) {
          const float a = acc_r[i * rv + c];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc_f[i * D + d] += a * U[c * D + d];
        }
        const float inv = 1.f / l[i];
        T* o = out + tok[r] * out_st + (h0 + i) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc_f[i * D + d] * inv);
      }
    }
  });
}

void dar_decode(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new, torch::Tensor out, torch::Tensor tok,
                torch::Tensor wcache, torch::Tensor wtable, torch::Tensor fcache, torch::Tensor ftable,
                torch::Tensor lens, torch::Tensor q_proj, torch::Tensor v_up, int64_t window, int64_t sinks,
                double scale) {
  const int64_t R = tok.size(0), H = q.size(1), D = q.size(2), J = k_new.size(1), G = fcache.size(1);
  const int64_t rk = q_proj.size(2), rv = v_up.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "dar_decode", [&] {
    decode_impl<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), k_new.data_ptr<scalar_t>(),
                          v_new.data_ptr<scalar_t>(), k_new.stride(0), out.data_ptr<scalar_t>(), out.stride(0),
                          tok.data_ptr<int64_t>(), wcache.data_ptr<scalar_t>(), wtable.data_ptr<int64_t>(),
                          wtable.stride(0), fcache.data_ptr<scalar_t>(), ftable.data_ptr<int64_t>(),
                          ftable.stride(0), lens.data_ptr<int64_t>(), q_proj.data_ptr<float>(),
                          v_up.data_ptr<float>(), R, H, J, G, D, rk, rv, wcache.size(2), fcache.size(2), window,
                          sinks, static_cast<float>(scale));
  });
}
"""

_CPP_DECL = ("void dar_decode(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new, torch::Tensor out, "
             "torch::Tensor tok, torch::Tensor wcache, torch::Tensor wtable, torch::Tensor fcache, "
             "torch::Tensor ftable, torch::Tensor lens, torch::Tensor q_proj, torch::Tensor v_up, int64_t window, "
             "int64_t sinks, double scale);")


@functools.cache
def kernel():
    """The compiled extension module, or None when it cannot be built (no compiler, ``VLLM_DAR_CPU_KERNEL=0``)."""
    if os.environ.get("VLLM_DAR_CPU_KERNEL", "1") == "0":
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(name="vllm_dar_cpu_decode", cpp_sources=[_CPP_DECL, _SOURCE], functions=["dar_decode"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        import logging

        logging.getLogger(__name__).warning("vllm-dar: C++ decode kernel unavailable (%s); using PyTorch", e)
        return None


def decode(query: Tensor, key: Tensor, value: Tensor, output: Tensor, tok: Tensor, window_cache: Tensor,
           window_table: Tensor, far_cache: Tensor, far_table: Tensor, lens: Tensor, q_proj: Tensor, v_up: Tensor,
           *, window: int, sink_tokens: int, scale: float) -> None:
    """Run the kernel for decode rows ``tok`` [R] of query/key/value/output; tables [R, *], lens [R] int64."""
    dt = query.dtype
    for name, x in (("key", key), ("value", value), ("output", output), ("window_cache", window_cache),
                    ("far_cache", far_cache)):
        if x.dtype != dt:
            raise TypeError(f"dar decode kernel: {name} is {x.dtype}, query is {dt}")
    for name, x in (("query", query), ("key", key), ("value", value), ("output", output)):
        if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
            raise ValueError(f"dar decode kernel: {name} rows must be contiguous [heads, head_dim]")
    if key.stride(0) != value.stride(0):
        raise ValueError("dar decode kernel: key and value need the same token stride")
    if not (window_cache.is_contiguous() and far_cache.is_contiguous()):
        raise ValueError("dar decode kernel: caches must be contiguous")
    kernel().dar_decode(query, key, value, output, tok, window_cache, window_table.long().contiguous(), far_cache,
                        far_table.long().contiguous(), lens, q_proj, v_up, window, sink_tokens, scale)
