// 16 fp32 lanes for the attention kernel (dar_attention.cpp), on AVX-512 or on AVX2 + FMA + F16C.
//
// The kernel's vector paths are written once, against the type V16 (16 floats), the mask M16 (one bit per lane,
// bit i = lane i) and I16 (16 int32 positions), with the operations below named after the AVX-512 intrinsics they
// are on that ISA (v16::fmadd is _mm512_fmadd_ps, and so on). With AVX-512 each is that one intrinsic. With AVX2
// (x86 CPUs without AVX-512: AMD Zen 1-3, many Intel client parts) V16 is a pair of 8-lane registers and a mask
// is expanded to lane vectors where an operation needs one; AVX2 has 16 vector registers against AVX-512's 32 and
// each V16 takes two, so the kernel's tiles hold fewer accumulators there (ACCUMULATORS).
//
// DAR_SIMD16 is defined when one of the two is compiled in (the build uses -march=native); without it the kernel
// takes its scalar loops.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#if defined(__AVX512F__)
#define DAR_SIMD16 1
#define DAR_SIMD16_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DAR_SIMD16 1
#define DAR_SIMD16_ISA "avx2"
#else
#define DAR_SIMD16_ISA "none"
#endif

#ifdef DAR_SIMD16
namespace vllm_dar {
namespace v16 {

using M16 = uint16_t;  // lane i selected when bit i is set (__mmask16 is this type)
constexpr M16 ALL = 0xFFFF;
// The first n lanes (n <= 16).
inline M16 first(int64_t n) { return n >= 16 ? ALL : static_cast<M16>((1u << n) - 1u); }

#if defined(__AVX512F__)
// Vector accumulators a kernel tile may keep in registers (32 zmm registers).
constexpr int ACCUMULATORS = 16;
using V16 = __m512;
using I16 = __m512i;

inline V16 zero() { return _mm512_setzero_ps(); }
inline V16 set1(float x) { return _mm512_set1_ps(x); }
inline V16 loadu(const float* p) { return _mm512_loadu_ps(p); }
inline V16 maskz_loadu(M16 k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
inline void storeu(float* p, V16 x) { _mm512_storeu_ps(p, x); }
inline void mask_storeu(float* p, M16 k, V16 x) { _mm512_mask_storeu_ps(p, k, x); }
inline V16 add(V16 a, V16 b) { return _mm512_add_ps(a, b); }
inline V16 sub(V16 a, V16 b) { return _mm512_sub_ps(a, b); }
inline V16 mul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
inline V16 fmadd(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }
inline V16 maskz_mov(M16 k, V16 x) { return _mm512_maskz_mov_ps(k, x); }
// Lanes of k: max(a, b); others: src.
inline V16 mask_max(V16 src, M16 k, V16 a, V16 b) { return _mm512_mask_max_ps(src, k, a, b); }
inline float reduce_add(V16 x) { return _mm512_reduce_add_ps(x); }
inline float reduce_max(V16 x) { return _mm512_reduce_max_ps(x); }
inline float mask_reduce_max(M16 k, V16 x) { return _mm512_mask_reduce_max_ps(k, x); }

inline V16 max(V16 a, V16 b) { return _mm512_max_ps(a, b); }
inline V16 floor(V16 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
// p * 2^n for whole n in the normal exponent range.
inline V16 scale_pow2(V16 p, V16 n) { return _mm512_scalef_ps(p, n); }

// r[0..16) = the transpose of the 16 x 16 tile r[0..16) (row i, lane j -> row j, lane i).
inline void transpose(V16* r) {
  V16 t[16];
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

// 16 consecutive elements widened to fp32.
inline V16 load(const float* p) { return _mm512_loadu_ps(p); }
inline V16 load(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 fp16 bit patterns (in int16 lanes) as fp32.
inline V16 from_half_bits(__m256i h) { return _mm512_cvtph_ps(h); }

// Positions (int32): aligned load; masks of lanes <=, >=, < a bound.
inline I16 load_i32(const int32_t* p) { return _mm512_load_si512(p); }
inline M16 le(I16 x, int32_t b) { return _mm512_cmple_epi32_mask(x, _mm512_set1_epi32(b)); }
inline M16 ge(I16 x, int32_t b) { return _mm512_cmpge_epi32_mask(x, _mm512_set1_epi32(b)); }
inline M16 lt(I16 x, int32_t b) { return _mm512_cmplt_epi32_mask(x, _mm512_set1_epi32(b)); }

#else  // AVX2 + FMA + F16C: two 8-lane halves, lanes 0-7 in lo

constexpr int ACCUMULATORS = 4;  // 16 ymm registers, two per V16: 8 spilled (slower in attention_cpu.py)
struct V16 {
  __m256 lo, hi;
};
struct I16 {
  __m256i lo, hi;
};

// The 8 lanes of bits (bit i = lane i) as an all-ones / all-zeros lane vector.
inline __m256i lanes8(unsigned bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}
inline M16 bits8(__m256 lanes_lo, __m256 lanes_hi) {
  return static_cast<M16>(_mm256_movemask_ps(lanes_lo) | (_mm256_movemask_ps(lanes_hi) << 8));
}

inline V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
// Masked-off lanes are not read (vmaskmovps does not fault on them).
inline V16 maskz_loadu(M16 k, const float* p) {
  if (k == ALL) return loadu(p);
  return {_mm256_maskload_ps(p, lanes8(k & 0xFF)), _mm256_maskload_ps(p + 8, lanes8(k >> 8))};
}
inline void storeu(float* p, V16 x) {
  _mm256_storeu_ps(p, x.lo);
  _mm256_storeu_ps(p + 8, x.hi);
}
inline void mask_storeu(float* p, M16 k, V16 x) {
  if (k == ALL) return storeu(p, x);
  _mm256_maskstore_ps(p, lanes8(k & 0xFF), x.lo);
  _mm256_maskstore_ps(p + 8, lanes8(k >> 8), x.hi);
}
inline V16 add(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 sub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 mul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V16 maskz_mov(M16 k, V16 x) {
  return {_mm256_and_ps(x.lo, _mm256_castsi256_ps(lanes8(k & 0xFF))),
          _mm256_and_ps(x.hi, _mm256_castsi256_ps(lanes8(k >> 8)))};
}
inline V16 mask_max(V16 src, M16 k, V16 a, V16 b) {
  return {_mm256_blendv_ps(src.lo, _mm256_max_ps(a.lo, b.lo), _mm256_castsi256_ps(lanes8(k & 0xFF))),
          _mm256_blendv_ps(src.hi, _mm256_max_ps(a.hi, b.hi), _mm256_castsi256_ps(lanes8(k >> 8)))};
}
inline float hsum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax8(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_add(V16 x) { return hsum8(_mm256_add_ps(x.lo, x.hi)); }
inline float reduce_max(V16 x) { return hmax8(_mm256_max_ps(x.lo, x.hi)); }
inline float mask_reduce_max(M16 k, V16 x) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  return hmax8(_mm256_max_ps(_mm256_blendv_ps(ninf, x.lo, _mm256_castsi256_ps(lanes8(k & 0xFF))),
                             _mm256_blendv_ps(ninf, x.hi, _mm256_castsi256_ps(lanes8(k >> 8)))));
}

inline V16 max(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V16 floor(V16 x) { return {_mm256_floor_ps(x.lo), _mm256_floor_ps(x.hi)}; }
// p * 2^n for whole n in the normal exponent range: 2^n built in the exponent field.
inline __m256 pow2(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V16 scale_pow2(V16 p, V16 n) { return {_mm256_mul_ps(p.lo, pow2(n.lo)), _mm256_mul_ps(p.hi, pow2(n.hi))}; }

// In-place transpose of 8 x 8 (row i, lane j -> row j, lane i).
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
// r[0..16) = the transpose of the 16 x 16 tile r[0..16): four 8 x 8 transposes.
inline void transpose(V16* r) {
  __m256 a[8], b[8], c[8], d[8];  // rows 0-7 lo, rows 8-15 lo, rows 0-7 hi, rows 8-15 hi
  for (int i = 0; i < 8; ++i) {
    a[i] = r[i].lo, b[i] = r[i + 8].lo, c[i] = r[i].hi, d[i] = r[i + 8].hi;
  }
  transpose8(a), transpose8(b), transpose8(c), transpose8(d);
  for (int i = 0; i < 8; ++i) {
    r[i] = {a[i], b[i]};
    r[i + 8] = {c[i], d[i]};
  }
}

inline V16 load(const float* p) { return loadu(p); }
inline V16 load(const c10::BFloat16* p) {
  const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16))};
}
inline V16 from_half_bits(__m256i h) {
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}

inline I16 load_i32(const int32_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
inline M16 gt_bits(I16 x, __m256i b) {  // lanes x > b
  return bits8(_mm256_castsi256_ps(_mm256_cmpgt_epi32(x.lo, b)), _mm256_castsi256_ps(_mm256_cmpgt_epi32(x.hi, b)));
}
inline M16 le(I16 x, int32_t b) { return static_cast<M16>(~gt_bits(x, _mm256_set1_epi32(b))); }
inline M16 lt(I16 x, int32_t b) {  // x < b  <=>  not x > b - 1 (b > INT32_MIN: positions are >= 0)
  return static_cast<M16>(~gt_bits(x, _mm256_set1_epi32(b - 1)));
}
inline M16 ge(I16 x, int32_t b) { return static_cast<M16>(~lt(x, b)); }
#endif

// exp(x) lane-wise for x <= 0 (both ISAs; clamped at -87, where exp is below fp32's normal range, so 2^n stays
// normal): 2^(x log2 e) split into an exponent n and a degree-6 polynomial for 2^f on [0, 1) (relative error
// ~2e-7).
inline V16 exp_neg(V16 x) {
  const V16 t = mul(max(x, set1(-87.f)), set1(1.44269504088896341f));
  const V16 n = floor(t);
  const V16 f = sub(t, n);
  V16 p = set1(1.535336188319500e-4f);
  p = fmadd(p, f, set1(1.339887440266574e-3f));
  p = fmadd(p, f, set1(9.618437357674640e-3f));
  p = fmadd(p, f, set1(5.550332471162809e-2f));
  p = fmadd(p, f, set1(2.402264791363012e-1f));
  p = fmadd(p, f, set1(6.931472028550421e-1f));
  p = fmadd(p, f, set1(1.f));
  return scale_pow2(p, n);
}

// FP8 through fp16 (both ISAs): e5m2 is the top byte of an fp16; e4m3fn's exponent and mantissa shifted into an
// fp16's (its bias 7 against fp16's 15: times 2^8, exact for subnormals too). The NaN encoding is never stored
// (store_as in dar_ops.h).
inline V16 load(const c10::Float8_e5m2* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return from_half_bits(_mm256_slli_epi16(b, 8));
}
inline V16 load(const c10::Float8_e4m3fn* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                    _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
  return mul(from_half_bits(h), set1(256.f));
}
// 16 cache elements as fp32 values: FP8 ones times their scale.
template <typename C>
inline V16 load_cache(const C* p, float scale) {
  if constexpr (std::is_same<C, c10::Float8_e4m3fn>::value || std::is_same<C, c10::Float8_e5m2>::value)
    return mul(load(p), set1(scale));
  else
    return load(p);
}

}  // namespace v16
}  // namespace vllm_dar
#endif
