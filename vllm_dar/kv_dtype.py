"""The KV cache dtypes a DAR model is served with, and how an FP8 cache stores a value (one place for both).

``--kv-cache-dtype`` (vLLM's ``cache_config.cache_dtype``) chooses the storage of the far cache (reduced K/V of
every token) and, with ``VLLM_DAR_FP8_WINDOW=1``, of the window cache (full-width K/V of the sinks and the
window) too (``cache_dtypes``):

``auto``                 the model dtype (fp32, bf16, fp16), values stored as they are;
``fp8`` / ``fp8_e4m3``    ``torch.float8_e4m3fn`` (3 mantissa bits, largest 448);
``fp8_e5m2``             ``torch.float8_e5m2`` (2 mantissa bits, largest 57344).

Why the window stays in the model dtype by default: full-width K/V in FP8 cost DAR what they cost stock vLLM
(about +1.5% perplexity with e4m3), the far cache's reduced K/V a tenth of that, and at long context the far
cache holds most of the bytes (README, "FP8 KV caches"). ``VLLM_DAR_FP8_WINDOW=1`` trades that quality for the
window's bytes.

vLLM allocates an FP8 cache as ``uint8``; the plugin views it as the FP8 dtype. An FP8 cache stores
``saturate(x / scale)`` rounded to nearest even, with the layer's ``k_scale`` for keys and reduced keys and its
``v_scale`` for values and reduced values (vLLM's per-layer scales: 1.0 unless the checkpoint ships others), and
reads back ``stored * scale``, widened to fp32; all arithmetic is fp32. Saturation (clamping to the format's
largest finite value) replaces the overflow that would store NaN (e4m3fn) or infinity (e5m2). Scales apply only to
FP8 caches, as in vLLM. Every other quantized ``CacheDType`` of vLLM is refused by name
(``vllm_dar.plugin.model.check_engine``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vllm_dar import envs

# vLLM's --kv-cache-dtype -> the torch dtype DAR caches hold (None: the model dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def cache_dtypes(kv_cache_dtype: str, fp8_window: bool | None = None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(window cache, far cache) dtypes for vLLM's ``--kv-cache-dtype`` (a key of ``KV_CACHE_DTYPES``; None: the
    model dtype): an FP8 dtype stores the far cache, and the window cache too under ``fp8_window`` (None: the
    environment's ``VLLM_DAR_FP8_WINDOW``)."""
    far = KV_CACHE_DTYPES[kv_cache_dtype]
    fp8_window = envs.VLLM_DAR_FP8_WINDOW if fp8_window is None else fp8_window
    return (far if far is not None and fp8_window else None), far


def cache_itemsizes(kv_cache_dtype: str, model_itemsize: int, *, dar: bool = True,
                    fp8_window: bool | None = None) -> tuple[int, int]:
    """Bytes per element of (the window cache, the far cache) that ``cache_dtypes`` gives, activations of
    ``model_itemsize`` bytes; ``dar=False``: a stock model's one cache, FP8 wholly (both entries alike)."""
    if not dar:
        size = 1 if KV_CACHE_DTYPES[kv_cache_dtype] is not None else model_itemsize
        return size, size
    window, far = cache_dtypes(kv_cache_dtype, fp8_window)
    return (model_itemsize if window is None else 1), (model_itemsize if far is None else 1)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize(x: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``x`` as a cache of ``dtype`` stores it: FP8 saturated ``x / scale``; other dtypes a plain cast."""
    if not is_fp8(dtype):
        return x.to(dtype)
    top = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-top, top).to(dtype)


def dequantize(x: Tensor, scale: float = 1.0) -> Tensor:
    """Cache elements read back as fp32 (FP8 ones times ``scale``)."""
    return x.float() * scale if is_fp8(x.dtype) else x.float()


def round_trip(x: Tensor, dtype: torch.dtype | None, scale: float = 1.0) -> Tensor:
    """``x`` stored in a cache of ``dtype`` and read back, in ``x``'s dtype (None: unchanged)."""
    if dtype is None or not is_fp8(dtype):
        return x
    return dequantize(quantize(x, dtype, scale), scale).to(x.dtype)
