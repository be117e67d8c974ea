"""Which implementation of the DAR cache write and attention the plugin runs (``VLLM_DAR_KERNELS``).

* ``torch`` (default): the batched CPU path (``vllm_dar.ops.batched``: one C++ call for the cache write and one
  for the attention of the whole batch, built on first use with the system compiler, or vectorised PyTorch when
  it cannot be built);
* ``reference``: the per-request PyTorch loop (``vllm_dar.ops.paged``), the simplest paged form of the math;
* ``triton``: the Triton kernels (``vllm_dar.ops.triton_ops``), the GPU path; on this CPU platform they run
  under ``TRITON_INTERPRET=1`` (slow, for end-to-end checks of the glue, metadata and kernels together).

All three implement one contract (see ``vllm_dar.ops.paged``) and are tested against the same reference.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from vllm_dar.ops.paged import write_kv

KINDS = ("torch", "reference", "triton")
DEFAULT = "torch"


@dataclass(frozen=True)
class DarOps:
    name: str
    write: Callable  # (key, value, *, window_cache, window_slots, far_cache, far_slots, proj) -> None
    attend: Callable  # dar_paged_attention's signature


def select_ops(kind: str | None = None) -> DarOps:
    kind = kind or os.environ.get("VLLM_DAR_KERNELS", DEFAULT)
    if kind == "torch":
        from vllm_dar.ops.batched import dar_paged_attention_batched, write_kv_batched
        from vllm_dar.ops.cpu_kernel import kernel

        kernel()  # build or load the C++ kernel now, not on the first request (None: the PyTorch path runs)
        return DarOps(kind, write_kv_batched, dar_paged_attention_batched)
    if kind == "reference":
        from vllm_dar.ops.paged import dar_paged_attention

        return DarOps(kind, write_kv, dar_paged_attention)
    if kind == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("vllm-dar: VLLM_DAR_KERNELS=triton on a machine without CUDA needs "
                                 "TRITON_INTERPRET=1 (Triton's interpreter) in the environment")
        from vllm_dar.ops.triton_ops import dar_paged_attention_triton, write_kv_triton

        return DarOps(kind, write_kv_triton, dar_paged_attention_triton)
    raise ValueError(f"vllm-dar: VLLM_DAR_KERNELS={kind!r}: expected one of {', '.join(KINDS)}")
