// The DAR CPU ops (vllm_dar::dar_attention, vllm_dar::dar_write): declarations shared by their source files and
// the op registration (torch_bindings.cpp, which holds each op's schema). Semantics: vllm_dar/ops/paged.py.
#pragma once

// torch/extension.h rather than torch/all.h: GCC's inlining choices in the attention kernel depend on what the
// translation unit holds, and with this header it generates the code that was measured (with torch/all.h it
// inlines exp_shifted and grows run_item by a third).
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

namespace vllm_dar {

// Widen a cache or activation element (float, at::BFloat16, c10::Float8_e4m3fn, c10::Float8_e5m2) to fp32: all
// arithmetic is fp32.
template <typename T>
inline float f32(T x) {
  return static_cast<float>(x);
}

template <typename C>
constexpr bool is_fp8 = std::is_same<C, c10::Float8_e4m3fn>::value || std::is_same<C, c10::Float8_e5m2>::value;

// x as a cache of element type C stores it (vllm_dar/kv_dtype.py): FP8 saturated x / scale, rounded to nearest
// even (c10's conversion, as torch's .to()); other types a plain cast, scale unused.
template <typename C>
inline C store_as(float x, float scale) {
  if constexpr (is_fp8<C>) {
    const float top = static_cast<float>(std::numeric_limits<C>::max());  // 448 (e4m3fn), 57344 (e5m2)
    const float y = x / scale;
    return static_cast<C>(y > top ? top : y < -top ? -top : y);  // NaN passes through
  } else {
    return static_cast<C>(x);
  }
}

// Whether each [heads, block_size, width] block of a cache is dense; blocks may sit apart (stride(0) larger than
// a block: vLLM pads the pages of layers with smaller ranks), and the kernels address them through stride(0).
inline bool dense_blocks(const torch::Tensor& cache) {
  const int64_t h = cache.size(1), b = cache.size(2), c = cache.size(3);
  return cache.stride(3) == 1 && cache.stride(2) == c && cache.stride(1) == b * c && cache.stride(0) >= h * b * c;
}

// Calls run(float{}) or run(at::BFloat16{}), the element type of the op's tensors (``dtype``); refuses any other
// dtype, naming the op.
template <typename Run>
inline void dispatch_fp32_bf16(at::ScalarType dtype, const char* op, Run&& run) {
  if (dtype == at::kFloat)
    run(float{});
  else if (dtype == at::kBFloat16)
    run(at::BFloat16{});
  else
    TORCH_CHECK(false, op, ": fp32 or bf16 only, got ", dtype);
}

// Calls run(T{}, WT{}, FT{}) with T the element type of the activations (``dtype``: float or at::BFloat16), WT
// that of the window cache and FT that of the far cache (``window_dtype``, ``far_dtype``): the pairs
// vllm_dar/kv_dtype.py serves, both T (``auto``), far cache FP8 and window T (``fp8``), or both in one FP8 type
// (``fp8`` with VLLM_DAR_FP8_WINDOW=1); refuses any other triple, naming the op.
template <typename Run>
inline void dispatch_with_caches(at::ScalarType dtype, at::ScalarType window_dtype, at::ScalarType far_dtype,
                                 const char* op, Run&& run) {
  dispatch_fp32_bf16(dtype, op, [&](auto zero) {
    using T = decltype(zero);
    if (window_dtype == dtype && far_dtype == dtype)
      run(zero, T{}, T{});
    else if (window_dtype == dtype && far_dtype == at::kFloat8_e4m3fn)
      run(zero, T{}, c10::Float8_e4m3fn{});
    else if (window_dtype == dtype && far_dtype == at::kFloat8_e5m2)
      run(zero, T{}, c10::Float8_e5m2{});
    else if (window_dtype == at::kFloat8_e4m3fn && far_dtype == window_dtype)
      run(zero, c10::Float8_e4m3fn{}, c10::Float8_e4m3fn{});
    else if (window_dtype == at::kFloat8_e5m2 && far_dtype == window_dtype)
      run(zero, c10::Float8_e5m2{}, c10::Float8_e5m2{});
    else
      TORCH_CHECK(false, op, ": the caches must be both in the activations' dtype ", dtype, ", the far cache in "
                  "float8_e4m3fn / float8_e5m2 and the window cache in ", dtype, " or the same FP8 dtype; got "
                  "window ", window_dtype, ", far ", far_dtype);
  });
}

void dar_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                   torch::Tensor& output, const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                   const torch::Tensor& window_cache, const torch::Tensor& window_table,
                   const torch::Tensor& far_cache, const torch::Tensor& far_table, const torch::Tensor& q_proj,
                   const torch::Tensor& v_up, int64_t window, int64_t sink_tokens, double scale,
                   int64_t rows_per_item, double k_scale, double v_scale);

// The vector ISA dar_attention was compiled for (simd16.h's DAR_SIMD16_ISA).
std::string simd();

void dar_write(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& window_cache,
               const torch::Tensor& window_slots, torch::Tensor& far_cache, const torch::Tensor& far_slots,
               const torch::Tensor& k_down, const torch::Tensor& v_down, double k_scale, double v_scale);

}  // namespace vllm_dar
