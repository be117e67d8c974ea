"""DAR attention and cache write over vLLM's paged caches: one contract (``vllm_dar.ops.paged``), three
implementations, chosen by ``select_ops`` (``VLLM_DAR_OPS``, defined in ``vllm_dar.envs``).

``paged``        the contract and the reference implementation: a per-request PyTorch loop (``reference``; also
                 the fallback where the C++ ops cannot be built)
``cpp``          the C++ CPU ops' launchers (``kernels/cpu/``): the whole batch in one call per layer
``triton_ops``   the Triton kernels' launchers (the GPU path)
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vllm_dar import envs


@dataclass(frozen=True)
class DarOps:
    """One implementation of the contract, named for what runs (``envs.OPS_KINDS``)."""

    name: str
    write: Callable  # (key, value, *, window_cache, window_slots, far_cache, far_slots, proj) -> None
    attend: Callable  # vllm_dar.ops.paged.dar_paged_attention's signature


def select_ops(kind: str | None = None) -> DarOps:
    """The ops of ``kind`` (default: ``VLLM_DAR_OPS``). ``cpp`` builds or loads the C++ ops now, not on the
    first request; if they cannot be built, logs a warning and returns ``reference`` (whose name the plugin's
    start-up summary then shows)."""
    kind = kind or envs.VLLM_DAR_OPS
    if kind == "cpp":
        from vllm_dar.ops import cpp

        if cpp.load():
            return DarOps(kind, cpp.write_kv_cpp, cpp.dar_paged_attention_cpp)
        logging.getLogger("vllm.vllm_dar").warning(
            "vllm-dar: the C++ CPU ops could not be built (see the warning above); running the reference "
            "ops (VLLM_DAR_OPS=reference), which are several times slower")
        kind = "reference"
    if kind == "reference":
        from vllm_dar.ops.paged import dar_paged_attention, write_kv

        return DarOps(kind, write_kv, dar_paged_attention)
    if kind == "triton":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("vllm-dar: VLLM_DAR_OPS=triton on a machine without CUDA needs "
                                 "TRITON_INTERPRET=1 (Triton's interpreter) in the environment")
        from vllm_dar.ops.triton_ops import dar_paged_attention_triton, write_kv_triton

        return DarOps(kind, write_kv_triton, dar_paged_attention_triton)
    raise ValueError(f"vllm-dar: VLLM_DAR_OPS={kind!r}: expected one of {', '.join(envs.OPS_KINDS)}")
