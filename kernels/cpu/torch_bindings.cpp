// The DAR CPU ops, each declared once: its schema (what it mutates is marked Tensor(a!)) and its CPU kernel.
// Loaded by vllm_dar/ops/cpp.py (torch.utils.cpp_extension.load), called as torch.ops.vllm_dar.<op>.

#include <torch/library.h>

#include "dar_ops.h"

TORCH_LIBRARY(vllm_dar, m) {
  // DAR attention of a batch (decodes and prefill chunks) into output; vllm_dar/ops/paged.py's contract.
  m.def(
      "dar_attention(Tensor query, Tensor key, Tensor value, Tensor(a!) output, Tensor query_start_loc, "
      "Tensor seq_lens, Tensor window_cache, Tensor window_table, Tensor far_cache, Tensor far_table, "
      "Tensor q_proj, Tensor v_up, int window, int sink_tokens, float scale, int rows_per_item, float k_scale, "
      "float v_scale) -> ()");
  // One layer's cache write: full-width K/V into the window cache, reduced K/V into the far cache.
  m.def(
      "dar_write(Tensor key, Tensor value, Tensor(a!) window_cache, Tensor window_slots, Tensor(b!) far_cache, "
      "Tensor far_slots, Tensor k_down, Tensor v_down, float k_scale, float v_scale) -> ()");
  // The vector ISA dar_attention was built with: "avx512", "avx2" or "none" (scalar loops).
  m.def("simd() -> str", &vllm_dar::simd);
}

TORCH_LIBRARY_IMPL(vllm_dar, CPU, m) {
  m.impl("dar_attention", &vllm_dar::dar_attention);
  m.impl("dar_write", &vllm_dar::dar_write);
}
