// The DAR CPU ops (vllm_dar::dar_attention, vllm_dar::dar_write): declarations shared by their source files and
// the op registration (torch_bindings.cpp, which holds each op's schema). Semantics: vllm_dar/ops/paged.py.
#pragma once

// torch/extension.h rather than torch/all.h: GCC's inlining choices in the attention kernel depend on what the
// translation unit holds, and with this header it generates the code that was measured (with torch/all.h it
// inlines exp_shifted and grows run_item by a third).
#include <torch/extension.h>

#include <cstdint>

namespace vllm_dar {

// Widen a cache or activation element (float, at::BFloat16) to fp32: all arithmetic is fp32.
template <typename T>
inline float f32(T x) {
  return static_cast<float>(x);
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

void dar_attention(const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
                   torch::Tensor& output, const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                   const torch::Tensor& window_cache, const torch::Tensor& window_table,
                   const torch::Tensor& far_cache, const torch::Tensor& far_table, const torch::Tensor& q_proj,
                   const torch::Tensor& v_up, int64_t window, int64_t sink_tokens, double scale,
                   int64_t rows_per_item);

void dar_write(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& window_cache,
               const torch::Tensor& window_slots, torch::Tensor& far_cache, const torch::Tensor& far_slots,
               const torch::Tensor& k_down, const torch::Tensor& v_down);

}  // namespace vllm_dar
