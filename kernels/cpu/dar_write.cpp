// The DAR cache write of one layer on the CPU (the op vllm_dar::dar_write; schema in torch_bindings.cpp,
// launcher vllm_dar/ops/cpp.py, semantics those of vllm_dar/ops/paged.py's write_kv): each scheduled token's
// full-width K/V into its window-cache slot and its reduced K/V into its far-cache slot, in one call.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "dar_ops.h"

namespace vllm_dar {
namespace {

// The cache write of one layer: token t's K/V [J, D] full width into window slot wslots[t], and its reduced
// K/V (the J / G heads of each group concatenated, times k_down [G, Dg, rk] / v_down [G, Dg, rv], in fp32)
// into far slot fslots[t]. Slots below one block (vLLM's null block 0, or -1) are skipped, as in
// vllm_dar.ops.paged.write_slots. Caches: dense blocks, block stride stride(0), element types WT (window) and FT
// (far): T itself (copied as it is) or FP8 (store_as: keys with ks, values with vs).
template <typename T, typename WT, typename FT>
static void write_token(const T* k, const T* v, int64_t ws, int64_t fs, WT* wcache, int64_t wbs, int64_t Bw,
                        FT* fcache, int64_t fbs, int64_t Bf, const float* kd, const float* vd, int64_t J,
                        int64_t D, int64_t G, int64_t rk, int64_t rv, float ks, float vs, float* xf, float* red) {
  if (ws >= Bw) {
    WT* dst = wcache + (ws / Bw) * wbs + (ws % Bw) * 2 * D;
    for (int64_t j = 0; j < J; ++j, dst += Bw * 2 * D) {
      if constexpr (std::is_same<T, WT>::value) {
        std::memcpy(dst, k + j * D, D * sizeof(T));
        std::memcpy(dst + D, v + j * D, D * sizeof(T));
      } else {
        for (int64_t d = 0; d < D; ++d) {
          dst[d] = store_as<WT>(f32(k[j * D + d]), ks);
          dst[D + d] = store_as<WT>(f32(v[j * D + d]), vs);
        }
      }
    }
  }
  if (fs < Bf) return;
  const int64_t Dg = J / G * D, C = rk + rv;
  FT* dst = fcache + (fs / Bf) * fbs + (fs % Bf) * C;
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
      FT* o = dst + (half ? rk : 0);
      const float sc = half ? vs : ks;
      for (int64_t c = 0; c < r; ++c) o[c] = store_as<FT>(red[c], sc);
    }
  }
}

}  // namespace

// key / value [T, J, D] (each token's [J, D] contiguous, any token stride); window_cache [NBw, J, Bw, 2D] and
// far_cache [NBf, G, Bf, rk + rv] (dense blocks, block stride stride(0)), in the pairs of dtypes
// dispatch_with_caches takes (k_scale / v_scale: the FP8 caches' scales); window_slots, far_slots [T] int64 flat
// slots (block * block_size + offset); k_down [G, Dg, rk], v_down [G, Dg, rv] fp32 contiguous, Dg = J / G * D.
void dar_write(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& wcache, const torch::Tensor& wslots,
               torch::Tensor& fcache, const torch::Tensor& fslots, const torch::Tensor& k_down,
               const torch::Tensor& v_down, double k_scale, double v_scale) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "dar_write: key and value must be [T, J, D], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(wcache.dim() == 4 && fcache.dim() == 4 && k_down.dim() == 3 && v_down.dim() == 3,
              "dar_write: caches must be [blocks, heads, block_size, width], k_down / v_down [G, Dg, rank]");
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "dar_write: key must be fp32 or bf16, got ", dt);
  TORCH_CHECK(v.scalar_type() == dt, "dar_write: value must be in the key dtype ", dt, ", got ", v.scalar_type());
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "dar_write: k_scale and v_scale must be > 0");
  TORCH_CHECK(k_down.scalar_type() == at::kFloat && v_down.scalar_type() == at::kFloat && k_down.is_contiguous() &&
                  v_down.is_contiguous(),
              "dar_write: k_down and v_down must be contiguous fp32");
  TORCH_CHECK(wslots.scalar_type() == at::kLong && fslots.scalar_type() == at::kLong && wslots.dim() == 1 &&
                  fslots.dim() == 1 && wslots.is_contiguous() && fslots.is_contiguous() &&
                  wslots.size(0) == k.size(0) && fslots.size(0) == k.size(0),
              "dar_write: window_slots and far_slots must be contiguous int64 [T]");
  for (const auto* x : {&k, &v})
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == k.size(2), "dar_write: each token's [J, D] of key and value "
                "must be contiguous");
  TORCH_CHECK(dense_blocks(wcache),
              "dar_write: each block of window_cache must be dense [heads, block_size, width]");
  TORCH_CHECK(dense_blocks(fcache),
              "dar_write: each block of far_cache must be dense [heads, block_size, width]");
  const int64_t J = k.size(1), D = k.size(2), G = k_down.size(0);
  TORCH_CHECK(G > 0 && J % G == 0 && k_down.size(1) == J / G * D && v_down.size(0) == G &&
                  v_down.size(1) == k_down.size(1),
              "dar_write: k_down / v_down must be [G, J / G * D, rank] with G dividing J");
  TORCH_CHECK(wcache.size(1) == J && wcache.size(3) == 2 * D, "dar_write: window_cache must be [blocks, J, "
              "block_size, 2D] = [*, ", J, ", *, ", 2 * D, "], got ", wcache.sizes());
  TORCH_CHECK(fcache.size(1) == G && fcache.size(3) == k_down.size(2) + v_down.size(2),
              "dar_write: far_cache must be [blocks, G, block_size, rk + rv], got ", fcache.sizes());
  const int64_t T_ = k.size(0), rk = k_down.size(2), rv = v_down.size(2), Bw = wcache.size(2), Bf = fcache.size(2);
  const int64_t* wsl = wslots.data_ptr<int64_t>();
  const int64_t* fsl = fslots.data_ptr<int64_t>();
  const float ks = static_cast<float>(k_scale), vs = static_cast<float>(v_scale);
  auto run = [&](auto zero, auto window_zero, auto far_zero) {
    using scalar_t = decltype(zero);
    using window_t = decltype(window_zero);
    using far_t = decltype(far_zero);
    const scalar_t *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const int64_t kst = k.stride(0), vst = v.stride(0);
    window_t* wc = wcache.data_ptr<window_t>();
    far_t* fc = fcache.data_ptr<far_t>();
    const float *kd = k_down.data_ptr<float>(), *vd = v_down.data_ptr<float>();
    at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(J * D), red(std::max(rk, rv));
      for (int64_t t = begin; t < end; ++t)
        write_token<scalar_t, window_t, far_t>(kp + t * kst, vp + t * vst, wsl[t], fsl[t], wc, wcache.stride(0),
                                               Bw, fc, fcache.stride(0), Bf, kd, vd, J, D, G, rk, rv, ks, vs,
                                               xf.data(), red.data());
    });
  };
  dispatch_with_caches(k.scalar_type(), wcache.scalar_type(), fcache.scalar_type(), "dar_write", run);
}

}  // namespace vllm_dar
