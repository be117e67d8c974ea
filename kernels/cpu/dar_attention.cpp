// DAR attention over vLLM's paged caches on the CPU (the op vllm_dar::dar_attention; schema in
// torch_bindings.cpp, launcher vllm_dar/ops/cpp.py, semantics those of vllm_dar/ops/paged.py): decodes and
// prefill chunks of a whole batch in one call.
//
// One work item = (request, projection group, tile of queries); its rows are (query, head of the group) pairs,
// so every far block is loaded once for all of them (GQA without expanding K/V; prefill queries share the block
// reads). The caches are read in place, through the block tables (no gather copy):
//  * full width ({s <= t: t - s < w or s < S}): cached sinks and window history from the window cache, the
//    chunk's own positions from the fresh key/value (rounded once per call as an FP8 window cache stores them,
//    so that a token's output does not depend on how its prompt was chunked); row-wise dot products at width D;
//  * reduced width ([S, t - w], from the first real far block under token budgets): per far block (or span of
//    one, for caches widened into scratch), scores (q Q_h) . k~ for every row, one online-softmax rescale per
//    span and row, values accumulated at width rv; projected up by U_h once per row at the end. The next span is
//    prefetched into L2 while this one computes.
// bf16 and FP8 caches are widened to fp32 on load (FP8 times the layer's k_scale / v_scale); all arithmetic is
// fp32; the output is written in the query dtype. The vector paths are written once against simd16.h's 16-lane
// type (AVX-512, or AVX2 + FMA + F16C); an FP8 window cache needs the vector full-width path (D a multiple of 16,
// at most 128), an FP8 far cache alone reads anywhere. vLLM's own CPU FP8 cache needs AVX-512; this op reads FP8
// with AVX2 too.

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "dar_ops.h"
#include "simd16.h"

namespace vllm_dar {
namespace {

#ifdef DAR_SIMD16
using namespace v16;  // V16, M16 and their operations (simd16.h): AVX-512, or AVX2 in pairs of registers
#endif

// x[i] = exp(x[i] - shift) for i < n, where every x[i] <= shift; returns the sum of the results.
static inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef DAR_SIMD16
  const V16 vs = set1(shift);
  V16 acc = zero();
  for (; i < n; i += 16) {
    const M16 k = first(n - i);
    const V16 e = exp_neg(sub(maskz_loadu(k, x + i), vs));
    mask_storeu(x + i, k, e);
    acc = add(acc, maskz_mov(k, e));
  }
  sum = reduce_add(acc);
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
#ifdef DAR_SIMD16
  V16 vm = set1(init);
  for (; i < n; i += 16) {
    const M16 k = first(n - i);
    vm = mask_max(vm, k, vm, maskz_loadu(k, x + i));
  }
  mx = reduce_max(vm);
#else
  for (; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
#endif
  return mx;
}

// Rows r < nr at once: acc[r * lda + c] += sum_x e[r * lde + x] * v[x * ld + c] for x < n, c < rv (v fp32 rows
// of stride ld): a small matrix product, e [nr, n] times v [n, rv], added to acc [nr, rv]. The kernel's three
// products take this form: the query projection (qf Q_h), the far values (scores times far value rows) and the
// up-projection (acc_r U_h).
// Vector path: NR rows at a time, each v vector loaded once for all of them, rv in NC = ceil(rv / 16) register chunks
// (the last one masked, so any rank runs the vector path); when NR x NC is small, K independent accumulator
// chains over the positions (one chain waits on the FMA latency at every position). rv > 128 and other CPUs:
// the scalar loop below.
#ifdef DAR_SIMD16
template <int NC, int NR, bool MASKED>
static void accumulate_block(float* acc, int64_t lda, const float* e, int64_t lde, const float* v, int64_t n,
                             int64_t ld, int64_t rv) {
  constexpr int K = NR * NC <= ACCUMULATORS / 8 ? 4 : NR * NC <= ACCUMULATORS / 2 ? 2 : 1;
  const M16 last = rv % 16 ? first(rv % 16) : ALL;
  auto mk = [&](int c) { return c == NC - 1 ? last : ALL; };
  // Loads of whole chunks unmasked: with a masked load in the loop GCC 12 keeps a[][][] in memory, storing it at
  // every position; MASKED (rv % 16 != 0) only for the last chunk's loads.
  auto load = [&](int c, const float* p) {
    return MASKED && c == NC - 1 ? maskz_loadu(last, p) : loadu(p);
  };
  V16 a[K][NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) {
      a[0][r][c] = maskz_loadu(mk(c), acc + r * lda + 16 * c);
      for (int k = 1; k < K; ++k) a[k][r][c] = zero();
    }
  int64_t x = 0;
  for (; x + K <= n; x += K) {
    for (int k = 0; k < K; ++k) {
      const float* vx = v + (x + k) * ld;
      V16 vc[NC];
      for (int c = 0; c < NC; ++c) vc[c] = load(c, vx + 16 * c);
      for (int r = 0; r < NR; ++r) {
        const V16 ex = set1(e[r * lde + x + k]);
        for (int c = 0; c < NC; ++c) a[k][r][c] = fmadd(ex, vc[c], a[k][r][c]);
      }
    }
  }
  for (; x < n; ++x) {
    V16 vc[NC];
    for (int c = 0; c < NC; ++c) vc[c] = load(c, v + x * ld + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const V16 ex = set1(e[r * lde + x]);
      for (int c = 0; c < NC; ++c) a[0][r][c] = fmadd(ex, vc[c], a[0][r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) {
      for (int k = 1; k < K; ++k) a[0][r][c] = add(a[0][r][c], a[k][r][c]);
      mask_storeu(acc + r * lda + 16 * c, mk(c), a[0][r][c]);
    }
}

// accumulate_block over nr rows, NRM at a time (NRM x NC <= ACCUMULATORS, NRM <= 4), then the rest together.
template <int NC, bool MASKED>
static void accumulate_rows(float* acc, int64_t lda, const float* e, int64_t lde, int64_t nr, const float* v,
                            int64_t n, int64_t ld, int64_t rv) {
  constexpr int NRM = std::max(1, std::min(4, ACCUMULATORS / NC));
  int64_t r = 0;
  for (; r + NRM <= nr; r += NRM)
    accumulate_block<NC, NRM, MASKED>(acc + r * lda, lda, e + r * lde, lde, v, n, ld, rv);
  float* ar = acc + r * lda;
  const float* er = e + r * lde;
  switch (nr - r) {
    case 3: if constexpr (NRM > 3) accumulate_block<NC, 3, MASKED>(ar, lda, er, lde, v, n, ld, rv); break;
    case 2: if constexpr (NRM > 2) accumulate_block<NC, 2, MASKED>(ar, lda, er, lde, v, n, ld, rv); break;
    case 1: accumulate_block<NC, 1, MASKED>(ar, lda, er, lde, v, n, ld, rv); break;
    default: break;
  }
}

template <int NC>
static void accumulate_avx(float* acc, int64_t lda, const float* e, int64_t lde, int64_t nr, const float* v,
                           int64_t n, int64_t ld, int64_t rv) {
  if (rv % 16)
    accumulate_rows<NC, true>(acc, lda, e, lde, nr, v, n, ld, rv);
  else
    accumulate_rows<NC, false>(acc, lda, e, lde, nr, v, n, ld, rv);
}
#endif

static void accumulate_scalar(float* acc, int64_t lda, const float* e, int64_t lde, int64_t nr, const float* v,
                              int64_t n, int64_t ld, int64_t rv) {
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t x = 0; x < n; ++x) {
      const float ex = e[r * lde + x];
      const float* vx = v + x * ld;
      float* ac = acc + r * lda;
#pragma omp simd
      for (int64_t c = 0; c < rv; ++c) ac[c] += ex * vx[c];
    }
}

using AccumulateFn = void (*)(float* acc, int64_t lda, const float* e, int64_t lde, int64_t nr, const float* v,
                              int64_t n, int64_t ld, int64_t rv);

// The accumulate for width rv (chosen once per work item).
static AccumulateFn accumulate_for(int64_t rv) {
#ifdef DAR_SIMD16
  switch ((rv + 15) / 16) {
    case 1: return accumulate_avx<1>;
    case 2: return accumulate_avx<2>;
    case 3: return accumulate_avx<3>;
    case 4: return accumulate_avx<4>;
    case 5: return accumulate_avx<5>;
    case 6: return accumulate_avx<6>;
    case 7: return accumulate_avx<7>;
    case 8: return accumulate_avx<8>;
    default: break;
  }
#endif
  return accumulate_scalar;
}

// Rows are token-major: q [T, H, D] (token stride q_st), k/v [T, J, D] (kv_st), out [T, H, D] (out_st).
// wcache [NBw, J, Bw, 2D] (block stride wbs) + wtable [R, mw]; fcache [NBf, G, Bf, rk + rv] (block stride fbs)
// + ftable [R, mf]: each block dense, blocks possibly padded (vLLM pads pages of per-layer ranks); qsl [R + 1],
// lens [R] (offsets and block tables int32, vLLM's own); q_proj [H, D, rk], v_up [H, rv, D] fp32.
// Window cache in WT, far cache in FT: T itself, or an FP8 type whose elements are read times ks (keys) or vs
// (values); the pairs are dispatch_with_caches's.
template <typename T, typename WT, typename FT> struct Args {
  const T *q, *k, *v;
  T* out;
  int64_t q_st, kv_st, out_st;
  const WT* wcache;
  const int32_t* wtable;
  int64_t mw, wbs;
  const FT* fcache;
  const int32_t* ftable;
  int64_t mf, fbs;
  const int32_t *qsl, *lens;
  const float *q_proj, *v_up;
  int64_t H, J, G, D, rk, rv, Bw, Bf, window, sinks;
  float scale, ks, vs;
};

// Widened (fp32) far-cache elements one span holds at most: 24 KB, an fp32 window page of SmolLM2 (16 slots of
// 3 x 128), which is what an fp32 far block holds.
constexpr int64_t kWidenFloats = 6144;

struct Scratch {
  std::vector<float> qf, qr, m, l, acc_f, acc_r, sc, fs, kt, rows, vb;
  std::vector<int64_t> lo, act;  // act: full_width_blocked's rows that see a chunk (with their masks, actvis)
  std::vector<uint16_t> actvis;
  std::vector<const void*> kp, vp;
};

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

// The far block's scores for every row: sc[row * lds + x] = qr[row] . rows[x, :rk] for x < ns (positions past ns
// may be written, up to lds); qr rows have stride ldq >= rk. Vector path: 16 positions x 16 ranks are loaded (the
// last rank tile masked, and qr zero-padded to ldq = rk rounded up to 16, so any rank takes this path) and
// transposed in registers, then each row's 16 scores are 16 broadcast FMAs. Other CPUs: transpose through kt
// [rk, ldk], vectorise over positions.
static inline void far_scores(const float* rows, int64_t ld, int64_t ns, int64_t rk, const float* qr, int64_t ldq,
                              int64_t nrow, float* sc, int64_t lds, float* kt, int64_t ldk) {
#ifdef DAR_SIMD16
  (void)kt, (void)ldk;
  for (int64_t x0 = 0; x0 < ns; x0 += 16) {
    const int64_t n = std::min<int64_t>(16, ns - x0);
    for (int64_t c0 = 0; c0 < rk; c0 += 16) {
      const int64_t cw = std::min<int64_t>(16, rk - c0);
      const M16 km = first(cw);
      V16 col[16];
      for (int64_t i = 0; i < 16; ++i)
        col[i] = i < n ? maskz_loadu(km, rows + (x0 + i) * ld + c0) : zero();
      transpose(col);
      // Four rows at a time: eight independent FMA chains (one row's two would wait on the FMA latency).
      int64_t row = 0;
      for (; row + 4 <= nrow; row += 4) {
        V16 s0[4], s1[4];
        for (int r = 0; r < 4; ++r) {
          s0[r] = c0 ? loadu(sc + (row + r) * lds + x0) : zero();
          s1[r] = zero();
        }
        for (int i = 0; i < 16; i += 2)
          for (int r = 0; r < 4; ++r) {
            const float* q = qr + (row + r) * ldq + c0;  // zero past rk: the masked ranks add nothing
            s0[r] = fmadd(set1(q[i]), col[i], s0[r]);
            s1[r] = fmadd(set1(q[i + 1]), col[i + 1], s1[r]);
          }
        for (int r = 0; r < 4; ++r) storeu(sc + (row + r) * lds + x0, add(s0[r], s1[r]));
      }
      for (; row < nrow; ++row) {
        const float* q = qr + row * ldq + c0;
        float* s = sc + row * lds + x0;
        V16 s0 = c0 ? loadu(s) : zero(), s1 = zero();
        for (int i = 0; i < 16; i += 2) {
          s0 = fmadd(set1(q[i]), col[i], s0);
          s1 = fmadd(set1(q[i + 1]), col[i + 1], s1);
        }
        storeu(s, add(s0, s1));
      }
    }
  }
#else
  for (int64_t x = 0; x < ns; ++x)
    for (int64_t c = 0; c < rk; ++c) kt[c * ldk + x] = rows[x * ld + c];
  for (int64_t row = 0; row < nrow; ++row) {
    float* si = sc + row * lds;
    const float* q = qr + row * ldq;
#pragma omp simd
    for (int64_t x = 0; x < ns; ++x) {  // vectorised over positions, the rank sum stays in a register
      float s = 0.f;
      for (int64_t c = 0; c < rk; ++c) s += q[c] * kt[c * ldk + x];
      si[x] = s;
    }
  }
#endif
}

#ifdef DAR_SIMD16
// NR rows against one chunk of 16 full-width positions of their KV head (kt [D, 16] transposed keys, vb [16, D]
// values, D = 16 NC): scores with the keys loaded once for all NR rows, each row's online-softmax update, then
// the values accumulated with each value vector loaded once for all NR rows (NR x NC accumulators in registers).
// rows[i]: row index (qf, m, l, acc_f are indexed by it); vis[i]: the positions row i sees.
template <int NC, int NR>
static inline void rows_chunk(const int64_t* rows, const M16* vis, const float* qf, const float* kt,
                              const float* vb, float* m, float* l, float* acc_f) {
  constexpr int D = 16 * NC;
  V16 s0[NR], s1[NR];
  for (int r = 0; r < NR; ++r) s0[r] = s1[r] = zero();
  for (int d = 0; d < D; d += 2) {
    const V16 k0 = loadu(kt + d * 16), k1 = loadu(kt + (d + 1) * 16);
    for (int r = 0; r < NR; ++r) {
      const float* q = qf + rows[r] * D;
      s0[r] = fmadd(set1(q[d]), k0, s0[r]);
      s1[r] = fmadd(set1(q[d + 1]), k1, s1[r]);
    }
  }
  alignas(64) float e[NR][16];
  for (int r = 0; r < NR; ++r) {
    const int64_t row = rows[r];
    const V16 sc = add(s0[r], s1[r]);
    const float cm = mask_reduce_max(vis[r], sc);
    if (cm > m[row]) {
      const float fs = std::exp(m[row] - cm);  // 0 on the row's first chunk (m = -inf)
      const V16 f = set1(fs);
      l[row] *= fs;
      float* acc = acc_f + row * D;
      for (int c = 0; c < NC; ++c) storeu(acc + 16 * c, mul(loadu(acc + 16 * c), f));
      m[row] = cm;
    }
    const V16 ex = maskz_mov(vis[r], exp_neg(sub(sc, set1(m[row]))));
    l[row] += reduce_add(ex);
    storeu(e[r], ex);
  }
  V16 acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = loadu(acc_f + rows[r] * D + 16 * c);
  for (int x = 0; x < 16; ++x)
    for (int c = 0; c < NC; ++c) {
      const V16 v = loadu(vb + x * D + 16 * c);
      for (int r = 0; r < NR; ++r) acc[r][c] = fmadd(set1(e[r][x]), v, acc[r][c]);
    }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) storeu(acc_f + rows[r] * D + 16 * c, acc[r][c]);
}

// rows_chunk over n rows, as many at a time as NC allows (NR x NC <= ACCUMULATORS, NR <= 4), the rest together.
template <int NC>
static void rows_chunk_n(int64_t n, const int64_t* rows, const M16* vis, const float* qf, const float* kt,
                         const float* vb, float* m, float* l, float* acc_f) {
  constexpr int NRM = std::max(1, std::min(4, ACCUMULATORS / NC));
  int64_t i = 0;
  for (; i + NRM <= n; i += NRM) rows_chunk<NC, NRM>(rows + i, vis + i, qf, kt, vb, m, l, acc_f);
  switch (n - i) {  // the rest together
    case 3: if constexpr (NRM > 3) rows_chunk<NC, 3>(rows + i, vis + i, qf, kt, vb, m, l, acc_f); break;
    case 2: if constexpr (NRM > 2) rows_chunk<NC, 2>(rows + i, vis + i, qf, kt, vb, m, l, acc_f); break;
    case 1: rows_chunk<NC, 1>(rows + i, vis + i, qf, kt, vb, m, l, acc_f); break;
    default: break;
  }
}

static void rows_chunk_any(int64_t nc, int64_t n, const int64_t* rows, const M16* vis, const float* qf,
                           const float* kt, const float* vb, float* m, float* l, float* acc_f) {
  switch (nc) {
    case 1: return rows_chunk_n<1>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 2: return rows_chunk_n<2>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 3: return rows_chunk_n<3>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 4: return rows_chunk_n<4>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 5: return rows_chunk_n<5>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 6: return rows_chunk_n<6>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 7: return rows_chunk_n<7>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    case 8: return rows_chunk_n<8>(n, rows, vis, qf, kt, vb, m, l, acc_f);
    default: TORCH_CHECK(false, "dar_attention: full-width chunks need head_dim a multiple of 16, <= 128");
  }
}
// The full-width part of one work item, 16 positions at a time (vector path, D a multiple of 16, D <= 128): for each
// KV head j of the group, the 16 positions' keys are transposed once into kt [D, 16] and their values widened
// into vb [16, D], then the rows of j that see any of them (act, their masks actvis: scratch of qn * H / G
// entries) go through rows_chunk, several at a time: scores, masks, online softmax (m, l, acc_f) once per chunk
// and row. Positions: the sinks below the item's first window
// start lo_min, then [lo_min, t_last]; row (query at t, window start lo) sees p <= t with p >= lo or p < S.
template <typename T, typename WT, typename FT>
static void full_width_blocked(const Args<T, WT, FT>& a, int64_t r, int64_t g, int64_t q0, int64_t qn, int64_t c0,
                               const float* qf, const int64_t* lo_row, float* m, float* l, float* acc_f,
                               float* kt, float* vb, int64_t* act, M16* actvis) {
  const int64_t D = a.D, hpg = a.H / a.G, rep = a.H / a.J, jpg = a.J / a.G, nd = D / 16;
  const int64_t t_first = c0 + q0, t_last = t_first + qn - 1;
  const int64_t lo_min = std::max<int64_t>(0, t_first - a.window + 1), n_sink = std::min(a.sinks, lo_min);
  const int64_t np = n_sink + (t_last - lo_min + 1);
  // Position of the item's i-th full-width position; offset of a cached position's row (KV head 0) in the window
  // cache, once per chunk for all the group's KV heads: shift and mask for power-of-two block sizes (the usual
  // ones; a 64-bit division per position is slow), division otherwise.
  auto pos = [&](int64_t i) { return i < n_sink ? i : lo_min + (i - n_sink); };
  const int64_t Bw = a.Bw, bw_shift = (Bw & (Bw - 1)) == 0 ? __builtin_ctzll(Bw) : -1;
  auto cached_off = [&](int64_t p) {
    const int64_t blk = bw_shift >= 0 ? p >> bw_shift : p / Bw, slot = bw_shift >= 0 ? p & (Bw - 1) : p % Bw;
    return a.wtable[r * a.mw + blk] * a.wbs + slot * 2 * D;
  };
  const int64_t head_step = Bw * 2 * D;  // from a KV head's rows to the next one's in a window block
  alignas(64) int32_t pbuf[16];
  int64_t off[16];
  const WT* kc[16];  // a cached position's key row (its value row follows at + D), or
  const T* kf[16];  // a chunk position's own key
  for (int64_t i0 = 0; i0 < np; i0 += 16) {
    const int64_t n = std::min<int64_t>(16, np - i0);
    for (int64_t x = 0; x < 16; ++x) pbuf[x] = static_cast<int32_t>(pos(i0 + std::min(x, n - 1)));
    for (int64_t x = 0; x < n; ++x) off[x] = pbuf[x] < c0 ? cached_off(pbuf[x]) : -1;
    const I16 pv = load_i32(pbuf);
    const M16 in_chunk = first(n);
    const int64_t p_min = pbuf[0], p_max = pbuf[n - 1];
    for (int64_t jj = 0; jj < jpg; ++jj) {
      const int64_t j = g * jpg + jj;
      for (int64_t x = 0; x < n; ++x) {
        kc[x] = off[x] >= 0 ? a.wcache + off[x] + j * head_step : nullptr;
        kf[x] = off[x] >= 0 ? nullptr : a.k + (a.qsl[r] + (pbuf[x] - c0)) * a.kv_st + j * D;
      }
      for (int64_t d0 = 0; d0 < nd; ++d0) {
        V16 col[16];
        for (int64_t x = 0; x < 16; ++x)
          col[x] = x >= n ? zero()
                   : kc[x] ? load_cache(kc[x] + d0 * 16, a.ks) : load(kf[x] + d0 * 16);
        transpose(col);
        for (int64_t i = 0; i < 16; ++i) storeu(kt + (d0 * 16 + i) * 16, col[i]);
        for (int64_t x = 0; x < 16; ++x) {
          V16 vx = zero();
          if (x < n)
            vx = kc[x] ? load_cache(kc[x] + D + d0 * 16, a.vs)
                       : load(a.v + (a.qsl[r] + (pbuf[x] - c0)) * a.kv_st + j * D + d0 * 16);
          storeu(vb + x * D + d0 * 16, vx);
        }
      }
      // The rows of KV head j that see some of the chunk, with what they see; then NR of them at a time.
      int64_t nact = 0;
      for (int64_t qi = 0; qi < qn; ++qi) {
        const int64_t t = t_first + qi;
        if (p_min > t) continue;  // the chunk is wholly after this query
        for (int64_t hh = jj * rep; hh < (jj + 1) * rep; ++hh) {
          const int64_t row = qi * hpg + hh, lo = lo_row[row];
          if (p_max < lo && p_min >= a.sinks) continue;
          const M16 vis = in_chunk & le(pv, static_cast<int32_t>(t)) &
                          (ge(pv, static_cast<int32_t>(lo)) | lt(pv, static_cast<int32_t>(a.sinks)));
          if (!vis) continue;
          act[nact] = row;
          actvis[nact++] = vis;
        }
      }
      rows_chunk_any(nd, nact, act, actvis, qf, kt, vb, m, l, acc_f);
    }
  }
}
#endif

// A far block's rows [ns, rk + rv] of an FP8 cache, widened to fp32 into rows: keys times ks, values times vs.
template <typename CT>
static void widen_fp8(const CT* src, int64_t ns, int64_t rk, int64_t rv, float ks, float vs, float* rows) {
  const int64_t C = rk + rv;
#ifdef DAR_SIMD16
  if (rk % 16 == 0 && rv % 16 == 0) {  // the recipe's ranks: whole 16-wide tiles (no division per tile)
    const V16 vk = set1(ks), vv = set1(vs);
    for (int64_t x = 0; x < ns; ++x, src += C, rows += C) {
      for (int64_t c = 0; c < rk; c += 16) storeu(rows + c, mul(load(src + c), vk));
      for (int64_t c = rk; c < C; c += 16) storeu(rows + c, mul(load(src + c), vv));
    }
    return;
  }
#endif
  for (int64_t x = 0; x < ns; ++x)
    for (int64_t c = 0; c < C; ++c) rows[x * C + c] = f32(src[x * C + c]) * (c < rk ? ks : vs);
}

// The full-width part of one row (query at t of request r, KV head j, window start lo), one position at a time:
// the path where full_width_blocked does not run (no AVX-512 or AVX2, or D not a multiple of 16 up to 128). Window
// cache and chunk in one type T (an FP8 window cache needs full_width_blocked).
template <typename T, typename FT, int HD>
static void full_width_row(const Args<T, T, FT>& a, int64_t r, int64_t row, int64_t j, int64_t t, int64_t lo,
                           int64_t c0, const float* qf, Scratch& w) {
  const int64_t D = HD ? HD : a.D;
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

// One work item: request r, projection group g, queries q0 .. q0 + qn - 1 of its chunk; a row is (query, head).
// HD: head_dim as a compile-time constant (0: read from Args), so the full-width loops unroll.
template <typename T, typename WT, typename FT, int HD>
static void run_item(const Args<T, WT, FT>& a, int64_t r, int64_t g, int64_t q0, int64_t qn, Scratch& w) {
  const int64_t rk = a.rk, rv = a.rv, D = HD ? HD : a.D;
  const int64_t ldq = (rk + 15) / 16 * 16;  // reduced-query stride: whole rank tiles, zero-padded
  const AccumulateFn accumulate = accumulate_for(rv), project = accumulate_for(rk), project_d = accumulate_for(D);
  const int64_t hpg = a.H / a.G, rep = a.H / a.J, C = rk + rv, Bf = a.Bf;
  const int64_t nrow = qn * hpg, ldk = Bf + 16;  // transposed-key stride: not 2^k (L1 set conflicts)
  const int64_t lds = (Bf + 15) / 16 * 16;         // score row stride: whole 16-wide stores
  const int64_t L = a.lens[r], tok0 = a.qsl[r] + q0, c0 = L - (a.qsl[r + 1] - a.qsl[r]);
  w.qf.resize(nrow * D); w.qr.assign(nrow * ldq, 0.f); w.m.resize(nrow); w.l.resize(nrow); w.lo.resize(nrow);
  w.acc_f.assign(nrow * D, 0.f); w.acc_r.assign(nrow * rv, 0.f); w.sc.resize(nrow * lds);
  w.kt.resize(rk * ldk); w.rows.resize(Bf * C);
  const int64_t nfull = a.sinks + std::max<int64_t>(a.window, 1) + 1;
  w.fs.resize(nfull); w.kp.resize(nfull); w.vp.resize(nfull);
#ifdef DAR_SIMD16
  const bool blocked = D % 16 == 0 && D <= 128;  // full width 16 positions at a time (full_width_blocked)
  if (blocked) {
    w.kt.resize(std::max(rk * ldk, 16 * D)); w.vb.resize(16 * D); w.act.resize(nrow); w.actvis.resize(nrow);
  }
#else
  const bool blocked = false;
#endif
  constexpr bool same = std::is_same<T, WT>::value;  // the scalar full-width path reads window cache and chunk alike
  TORCH_CHECK(same || blocked,
              "dar_attention: an FP8 window cache needs AVX-512 or AVX2 and head_dim a multiple of 16, <= 128");
  int64_t max_lo = 0;
  for (int64_t row = 0; row < nrow; ++row) {
    const int64_t qi = row / hpg, h = g * hpg + row % hpg, t = c0 + q0 + qi;
    const T* qrow = a.q + (tok0 + qi) * a.q_st + h * D;
    float* qf = w.qf.data() + row * D;
    for (int64_t d = 0; d < D; ++d) qf[d] = f32(qrow[d]) * a.scale;
    // Full width: {s <= t : t - s < w or s < S}. lo = first window position; the reduced ones are [S, lo).
    const int64_t lo = std::max<int64_t>(0, t - a.window + 1);
    w.lo[row] = lo;
    max_lo = std::max(max_lo, lo);
    if (blocked || !same) {
      w.m[row] = -INFINITY;
      w.l[row] = 0.f;
      continue;
    }
    if constexpr (same) full_width_row<T, FT, HD>(a, r, row, h / rep, t, lo, c0, qf, w);
  }
#ifdef DAR_SIMD16
  if (blocked)
    full_width_blocked(a, r, g, q0, qn, c0, w.qf.data(), w.lo.data(), w.m.data(), w.l.data(), w.acc_f.data(),
                       w.kt.data(), w.vb.data(), w.act.data(), w.actvis.data());
#endif
  // qr = qf Q_h (qr was zeroed), the rows of each head together: they share Q_h.
  for (int64_t hh = 0; hh < hpg; ++hh)
    project(w.qr.data() + hh * ldq, hpg * ldq, w.qf.data() + hh * D, hpg * D, qn, a.q_proj + (g * hpg + hh) * D * rk,
            D, rk, rk);
  // Reduced width: positions [S, lo) per row, in spans of at most seg positions inside one far block; one rescale
  // per span and row. An fp32 cache is read in place a block at a time (its block is one window page); other dtypes
  // are widened into scratch, in spans of at most kWidenFloats fp32 elements, so that the widened rows stay in L1
  // where a block holds more positions (an FP8 far block beside an fp32 window holds 4x an fp32 one's).
  constexpr bool in_place = std::is_same<FT, float>::value;
  const int64_t seg = in_place ? Bf : std::min(Bf, std::max<int64_t>(16, kWidenFloats / C / 16 * 16));
  auto span_end = [&](int64_t s) { return std::min({max_lo, (s / Bf + 1) * Bf, s + seg}); };
  auto span_rows = [&](int64_t s) { return a.fcache + a.ftable[r * a.mf + s / Bf] * a.fbs + (g * Bf + s % Bf) * C; };
  // Token budgets null the far blocks below a compacted prompt's kept span (vllm_dar/ops/paged.py far_start):
  // far positions start at the request's first real block, never below the sinks.
  int64_t first_block = 0;
  const int32_t* frow = a.ftable + r * a.mf;
  while (first_block < a.mf && first_block * Bf < max_lo && frow[first_block] == 0) ++first_block;
  for (int64_t s0 = std::max(a.sinks, first_block * Bf), s1; s0 < max_lo; s0 = s1) {
    s1 = span_end(s0);
    const int64_t ns = s1 - s0;
    // The span's rows [ns, C]: read in place when fp32, widened into scratch when bf16 or FP8 (times the scales).
    const FT* src = span_rows(s0);
    // The next span's rows, while this one computes (block ids jump, so the hardware prefetcher cannot), into
    // L2 (prefetcht2): prefetching into L1 stalls on the line-fill buffers.
    if (s1 < max_lo) {
      const char* nx = reinterpret_cast<const char*>(span_rows(s1));
      const int64_t bytes = (span_end(s1) - s1) * C * static_cast<int64_t>(sizeof(FT));
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(nx + o, 0, 1);
    }
    const float* rows = w.rows.data();  // [ns, C] fp32: the cache rows themselves when it is fp32
    if constexpr (in_place) {
      rows = src;
    } else if constexpr (is_fp8<FT>) {
      widen_fp8(src, ns, rk, rv, a.ks, a.vs, w.rows.data());
    } else {
#pragma omp simd
      for (int64_t e = 0; e < ns * C; ++e) w.rows[e] = f32(src[e]);
    }
    far_scores(rows, C, ns, rk, w.qr.data(), ldq, nrow, w.sc.data(), lds, w.kt.data(), ldk);
    // Rows see a prefix of the span (nv positions, non-decreasing with the row: rows are query-major); the
    // weights past a row's prefix are zeroed, so the rows that see the span [first, nrow) take their values
    // together (accumulate shares each value row among them).
    int64_t first = nrow, nmax = 0;
    for (int64_t row = 0; row < nrow; ++row) {
      const int64_t nv = std::min(ns, w.lo[row] - s0);  // visible prefix of this span
      if (nv <= 0) continue;
      first = std::min(first, row);
      nmax = std::max(nmax, nv);
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
    }
    if (first == nrow) continue;
    for (int64_t row = first; row < nrow; ++row)
      std::fill(w.sc.data() + row * lds + std::max<int64_t>(0, std::min(ns, w.lo[row] - s0)),
                w.sc.data() + row * lds + nmax, 0.f);
    accumulate(w.acc_r.data() + first * rv, rv, w.sc.data() + first * lds, lds, nrow - first, rows + rk, nmax, C, rv);
  }
  // Project the reduced accumulator up once per row (acc_f += acc_r U_h, the rows of each head together),
  // normalise, store.
  for (int64_t hh = 0; hh < hpg; ++hh)
    project_d(w.acc_f.data() + hh * D, hpg * D, w.acc_r.data() + hh * rv, hpg * rv, qn,
              a.v_up + (g * hpg + hh) * rv * D, rv, D, D);
  for (int64_t row = 0; row < nrow; ++row) {
    const int64_t qi = row / hpg, h = g * hpg + row % hpg;
    const float* acc = w.acc_f.data() + row * D;
    const float inv = 1.f / w.l[row];
    T* o = a.out + (tok0 + qi) * a.out_st + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] * inv);
  }
}
}  // namespace

std::string simd() { return DAR_SIMD16_ISA; }

// Refuses what the kernel would misread: it indexes raw pointers with the shapes and strides named here.
static void check_attention_args(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& out, const torch::Tensor& qsl, const torch::Tensor& lens,
                                 const torch::Tensor& wcache, const torch::Tensor& wtable,
                                 const torch::Tensor& fcache, const torch::Tensor& ftable,
                                 const torch::Tensor& q_proj, const torch::Tensor& v_up) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && out.dim() == 3,
              "dar_attention: query, key, value and output must be [tokens, heads, head_dim]");
  TORCH_CHECK(wcache.dim() == 4 && fcache.dim() == 4,
              "dar_attention: window_cache and far_cache must be [blocks, heads, block_size, width]");
  TORCH_CHECK(q_proj.dim() == 3 && v_up.dim() == 3, "dar_attention: q_proj must be [H, D, rk], v_up [H, rv, D]");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), J = k.size(1), G = fcache.size(1), R = lens.size(0);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "dar_attention: query must be fp32 or bf16, got ", dt);
  for (const auto* x : {&k, &v, &out})
    TORCH_CHECK(x->scalar_type() == dt, "dar_attention: key, value and output must be in the query dtype ", dt,
                ", got ", x->scalar_type());
  TORCH_CHECK(q_proj.scalar_type() == at::kFloat && v_up.scalar_type() == at::kFloat,
              "dar_attention: q_proj and v_up must be fp32");
  for (const auto* x : {&qsl, &lens, &wtable, &ftable})
    TORCH_CHECK(x->scalar_type() == at::kInt, "dar_attention: query_start_loc, seq_lens and the block tables "
                "must be int32, got ", x->scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == T && out.sizes() == q.sizes() && k.size(2) == D,
              "dar_attention: key and value must be [T, J, D] and output [T, H, D] for query [T, H, D]");
  TORCH_CHECK(J > 0 && G > 0 && H % J == 0 && J % G == 0,
              "dar_attention: query heads must be a multiple of KV heads, KV heads of far-cache groups");
  for (const auto* x : {&q, &k, &v, &out})
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == D,
                "dar_attention: each token's rows of query, key, value and output must be contiguous [heads, D]");
  // One token: its stride is never used (PyTorch keeps any stride on a size-1 dimension, even after contiguous()).
  TORCH_CHECK(k.size(0) <= 1 || k.stride(0) == v.stride(0),
              "dar_attention: key and value must share one token stride");
  TORCH_CHECK(dense_blocks(wcache),
              "dar_attention: each block of window_cache must be dense [heads, block_size, width]");
  TORCH_CHECK(dense_blocks(fcache),
              "dar_attention: each block of far_cache must be dense [heads, block_size, width]");
  TORCH_CHECK(wcache.size(1) == J && wcache.size(3) == 2 * D, "dar_attention: window_cache must be [blocks, J, "
              "block_size, 2D] = [*, ", J, ", *, ", 2 * D, "], got ", wcache.sizes());
  TORCH_CHECK(q_proj.is_contiguous() && v_up.is_contiguous() && q_proj.size(0) == H && q_proj.size(1) == D &&
                  v_up.size(0) == H && v_up.size(2) == D,
              "dar_attention: q_proj must be contiguous [H, D, rk] and v_up [H, rv, D]");
  TORCH_CHECK(fcache.size(3) == q_proj.size(2) + v_up.size(1), "dar_attention: far_cache's width must be rk + rv = ",
              q_proj.size(2) + v_up.size(1), ", got ", fcache.size(3));
  TORCH_CHECK(qsl.is_contiguous() && lens.is_contiguous() && qsl.dim() == 1 && lens.dim() == 1 &&
                  qsl.size(0) == R + 1,
              "dar_attention: query_start_loc must be [R + 1] and seq_lens [R], contiguous");
  TORCH_CHECK(wtable.dim() == 2 && ftable.dim() == 2 && wtable.size(0) >= R && ftable.size(0) >= R &&
                  wtable.stride(1) == 1 && ftable.stride(1) == 1,
              "dar_attention: window_table and far_table must be [R, max_blocks] with contiguous rows");
}

// query [T, H, D], key / value [T, J, D] (the scheduled tokens, any token stride), output [T, H, D];
// query_start_loc [R + 1], seq_lens [R]; window_cache [NBw, J, Bw, 2D] + window_table [R, mw];
// far_cache [NBf, G, Bf, rk + rv] + far_table [R, mf]; q_proj [H, D, rk], v_up [H, rv, D] fp32; caches in the
// pairs of dtypes dispatch_with_caches takes, FP8 ones read times k_scale (keys) / v_scale (values).
// rows_per_item: (query, head) rows per work item (the queries of a tile times the heads of a group).
void dar_attention(const torch::Tensor& q, const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& out,
                   const torch::Tensor& qsl, const torch::Tensor& lens, const torch::Tensor& wcache,
                   const torch::Tensor& wtable, const torch::Tensor& fcache, const torch::Tensor& ftable,
                   const torch::Tensor& q_proj, const torch::Tensor& v_up, int64_t window, int64_t sinks,
                   double scale, int64_t rows_per_item, double k_scale, double v_scale) {
  check_attention_args(q, key, value, out, qsl, lens, wcache, wtable, fcache, ftable, q_proj, v_up);
  TORCH_CHECK(window >= 0 && sinks >= 0 && rows_per_item >= 1,
              "dar_attention: window and sink_tokens must be >= 0, rows_per_item >= 1");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "dar_attention: k_scale and v_scale must be > 0");
  // The chunk's own K/V as an FP8 window cache stores and reads them back (in the activations' dtype, as
  // vllm_dar/ops/paged.py), once per call: not read from the cache itself, since the window manager
  // (vllm_dar/plugin/spec.py) never holds a whole chunk at full width.
  const bool fp8 = wcache.scalar_type() == at::kFloat8_e4m3fn || wcache.scalar_type() == at::kFloat8_e5m2;
  auto as_cached = [&](const torch::Tensor& x, double s) {
    if (!fp8) return x;
    const double top = wcache.scalar_type() == at::kFloat8_e4m3fn
                           ? static_cast<double>(std::numeric_limits<c10::Float8_e4m3fn>::max())
                           : static_cast<double>(std::numeric_limits<c10::Float8_e5m2>::max());
    const torch::Tensor stored = x.to(at::kFloat).div(s).clamp(-top, top).to(wcache.scalar_type());
    return stored.to(at::kFloat).mul(s).to(x.scalar_type());
  };
  const torch::Tensor k = as_cached(key, k_scale), v = as_cached(value, v_scale);
  const int64_t R = lens.size(0), G = fcache.size(1), hpg = q.size(1) / G;
  const int32_t* qs = qsl.data_ptr<int32_t>();
  const int64_t qt = std::max<int64_t>(1, rows_per_item / hpg);  // queries per work item
  std::vector<std::array<int64_t, 4>> items;  // (request, group, first query, queries)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t q0 = 0; q0 < int64_t{qs[r + 1]} - qs[r]; q0 += qt)
      for (int64_t g = 0; g < G; ++g) items.push_back({r, g, q0, std::min(qt, int64_t{qs[r + 1]} - qs[r] - q0)});
  auto run = [&](auto zero, auto window_zero, auto far_zero) {
    using scalar_t = decltype(zero);
    using window_t = decltype(window_zero);
    using far_t = decltype(far_zero);
    Args<scalar_t, window_t, far_t> a{
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        q.stride(0), k.stride(0), out.stride(0), wcache.data_ptr<window_t>(), wtable.data_ptr<int32_t>(),
        wtable.stride(0), wcache.stride(0), fcache.data_ptr<far_t>(), ftable.data_ptr<int32_t>(),
        ftable.stride(0), fcache.stride(0), qs, lens.data_ptr<int32_t>(), q_proj.data_ptr<float>(),
        v_up.data_ptr<float>(), q.size(1), k.size(1), G, q.size(2), q_proj.size(2), v_up.size(1), wcache.size(2),
        fcache.size(2), window, sinks, static_cast<float>(scale), static_cast<float>(k_scale),
        static_cast<float>(v_scale)};
    const bool d64 = a.D == 64;  // SmolLM2's head_dim
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      thread_local Scratch w;  // kept across calls: no allocation per layer call once sizes have been seen
      for (int64_t i = begin; i < end; ++i) {
        const auto& it = items[i];
        if (d64)
          run_item<scalar_t, window_t, far_t, 64>(a, it[0], it[1], it[2], it[3], w);
        else
          run_item<scalar_t, window_t, far_t, 0>(a, it[0], it[1], it[2], it[3], w);
      }
    });
  };
  dispatch_with_caches(q.scalar_type(), wcache.scalar_type(), fcache.scalar_type(), "dar_attention", run);
}

}  // namespace vllm_dar
