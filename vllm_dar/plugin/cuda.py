"""The DAR plugin on CUDA: vLLM's ``CUSTOM`` backend, its metadata builder and impl, running the Triton kernels.

vLLM on CUDA honours ``--attention-backend CUSTOM``; ``vllm_dar.plugin.register_backend_override`` points that
slot at ``DarCudaBackend``, and for a checkpoint with a ``dar`` section the patch
``vllm_dar.patches.dar_backend_selection`` selects it without the flag. Same cache layout (``DarWindowSpec`` +
``DarFarCache``, window manager), attach logic and metadata as the CPU platform (``vllm_dar.plugin.common``);
what differs:

* the ops are always the Triton kernels (``select_ops("triton")``, launchers in ``vllm_dar.ops.triton_ops``);
* the metadata builder (``DarCudaMetadataBuilder``) leaves ``query_start_loc`` and ``seq_lens`` on the device;
* there is no stock fallback: a model without a ``dar`` section is refused at start-up, naming what to use.

``DarCudaBackendOnCpu`` is the same backend under the CPU platform's name: ``VLLM_DAR_CPU_BACKEND=cuda`` (with
``TRITON_INTERPRET=1``) points ``CPU_ATTN`` at it, so this backend's builder, impl and kernels serve a model in
the real engine on a machine without a GPU (``tests/engine/test_kernel_paths.py``).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionImpl,
    AttentionType,
    CommonAttentionMetadata,
)

from vllm_dar.config import DarConfigError

from .common import DarBackend, DarFarBackend, DarImplMixin, DarMetadataBuilder, DarWindowBackend


class DarCudaMetadataBuilder(DarMetadataBuilder):
    """Offsets left on the device, as slices of vLLM's buffers: the Triton launcher takes tensors, so building
    costs no host copy or sync per step.

    CUDA graphs: full graphs for batches of single-token decodes (UNIFORM_SINGLE_TOKEN_DECODE), piecewise
    otherwise. The launcher is capturable (``vllm_dar.ops.triton_ops.Workspace``: persistent split scratch, no
    host reads, grids from shapes only). In a padded replay vLLM gives each padding request a query range of
    length 0, ``seq_len`` 0 and null block-table rows: its tile exits at once, and rows past
    ``query_start_loc[-1]`` are never written (``tests/kernels/test_graphs.py``; the CUDA half runs only on a GPU).
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @staticmethod
    def offsets(m: CommonAttentionMetadata, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return m.query_start_loc[: r + 1], m.seq_lens[:r]


class DarCudaBackend(DarBackend):
    """What ``--attention-backend CUSTOM`` selects, and the CUDA platform's choices for its DAR cache groups; its
    layers move onto ``DarCudaWindowBackend`` once loaded."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]  # the Triton kernels read caches in the model dtype

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_builder_cls():
        return DarCudaMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return DarCudaImpl

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8  # the kernels target sm_80 and up (bf16 tl.dot needs it)


class DarCudaWindowBackend(DarWindowBackend, DarCudaBackend):
    """A DAR layer on CUDA: full-width window + sinks here, reduced K/V in its ``.dar_far`` companion."""


class DarCudaFarBackend(DarFarBackend, DarCudaBackend):
    """The far cache companion on CUDA."""


class DarCudaBackendOnCpu(DarCudaBackend):
    """``DarCudaBackend`` registered as ``CPU_ATTN`` (``VLLM_DAR_CPU_BACKEND=cuda``): the layer looks its backend
    up in the enum by name, and the CPU platform only ever selects ``CPU_ATTN``."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"


def refuse_stock_model(model: str) -> DarConfigError:
    return DarConfigError(
        f"vllm-dar: the DAR attention backend (vLLM's CUSTOM backend, registered by vllm-dar) serves only "
        f"DAR-converted checkpoints (a `dar` section in config.json), and {model!r} has none. Serve it with a "
        "stock backend: drop --attention-backend CUSTOM (vLLM picks one) or name one, e.g. --attention-backend "
        "FLASH_ATTN (on CPU: unset VLLM_DAR_CPU_BACKEND).")


class DarCudaImpl(DarImplMixin, AttentionImpl):
    """DAR attention with the Triton kernels; refuses models without a ``dar`` section."""

    window_backend = DarCudaWindowBackend
    far_backend = DarCudaFarBackend
    ops_kind: ClassVar[str | None] = "triton"

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        # What check_layer reads, in the CPU impl's conventions (no window: -1; no soft cap: 0).
        self.num_heads, self.head_size, self.scale, self.num_kv_heads = num_heads, head_size, float(scale), num_kv_heads
        self.alibi_slopes, self.sliding_window = alibi_slopes, -1 if sliding_window is None else sliding_window
        self.kv_cache_dtype, self.logits_soft_cap, self.attn_type = kv_cache_dtype, logits_soft_cap or 0, attn_type
        self.kv_sharing_target_layer_name, self.sinks = kv_sharing_target_layer_name, sinks
        if self._init_dar() is None:
            model_config = get_current_vllm_config().model_config
            raise refuse_stock_model(model_config.model if model_config is not None else "the model")

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """key, value: [T, J, D]; see ``DarImplMixin._dar_write``."""
        self._dar_write(key, value, kv_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query: [T, H, D] -> output [T, H, D]; K/V were stored by ``do_kv_cache_update``."""
        return self._dar_forward(query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
