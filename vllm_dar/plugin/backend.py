"""Attention backends of the DAR plugin on vLLM's CPU platform.

* ``DarCpuBackend`` replaces ``CPU_ATTN`` in vLLM's registry (see ``vllm_dar.register``). It *is* the stock
  backend (subclass, same name, same builder) with an impl that stays stock for every layer of a model without
  a ``dar`` section. For a DAR model the impl moves its layer onto ``DarWindowBackend`` at weight-loading time.
* ``DarWindowBackend``: the DAR layer's own (window) cache group; ``DarFarBackend``: the companion far cache
  group. Both build the same small metadata (host lists the CPU ops index directly).

``get_name()`` stays ``"CPU_ATTN"`` on all three: the Attention layer looks its backend up in the enum by name.
The CUDA backends (``vllm_dar.plugin.cuda``) share this metadata, with ``DarDeviceMetadataBuilder``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import KVCacheLayout


class DarCpuBackend(CPUAttentionBackend):
    """Stock CPU attention, with an impl that switches DAR layers to ``DarWindowBackend``."""

    @staticmethod
    def get_impl_cls():
        from .impl import DarCpuImpl

        return DarCpuImpl


@dataclass
class DarMetadata:
    """Per-batch metadata of one DAR cache group (window or far)."""

    num_actual_tokens: int
    query_start_loc: list[int] | torch.Tensor  # R + 1 token offsets (a device tensor on the CUDA path)
    seq_lens: list[int] | torch.Tensor  # R: cached + scheduled tokens per request (likewise)
    block_table: torch.Tensor  # [R, max_blocks] block ids of this group


class DarMetadataBuilder(AttentionMetadataBuilder[DarMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DarMetadata:
        m = common_attn_metadata
        r = m.num_reqs
        return DarMetadata(num_actual_tokens=m.num_actual_tokens,
                           query_start_loc=m.query_start_loc_cpu[: r + 1].tolist(),
                           seq_lens=m.seq_lens[:r].cpu().tolist(),
                           block_table=m.block_table_tensor[:r])


class DarDeviceMetadataBuilder(DarMetadataBuilder):
    """The same metadata with ``query_start_loc`` and ``seq_lens`` left on the device, as slices of vLLM's
    buffers: the Triton launcher takes tensors, so building costs no host copy or sync per step.

    CUDA graphs: NEVER (vLLM then captures piecewise graphs only; attention runs eagerly between them). The
    launcher allocates its split scratch per call and sizes its grid from the step's token count, and padded
    requests of a replayed graph were never tested; FULL graphs would need persistent scratch first.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DarMetadata:
        m = common_attn_metadata
        r = m.num_reqs
        return DarMetadata(num_actual_tokens=m.num_actual_tokens, query_start_loc=m.query_start_loc[: r + 1],
                           seq_lens=m.seq_lens[:r], block_table=m.block_table_tensor[:r])


class _DarBackendBase(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(1)]  # the torch path reads any block size: never split allocator blocks

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # [blocks, heads, block_size, k + v]: see vllm_dar.ops.paged

    @staticmethod
    def get_builder_cls():
        return DarMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []


class DarWindowBackend(_DarBackendBase):
    """A DAR layer: full-width window + sinks in its own cache, reduced K/V in its ``.dar_far`` companion."""

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @staticmethod
    def get_impl_cls():
        from .impl import DarCpuImpl

        return DarCpuImpl


class DarFarBackend(_DarBackendBase):
    """The far cache companion: written and read by its DAR layer's impl, never run on its own."""

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the DAR far cache has no attention impl of its own")
