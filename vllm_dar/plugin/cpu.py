"""The DAR plugin on vLLM's CPU platform: backends, metadata builder and impl.

* ``DarCpuBackend`` replaces ``CPU_ATTN`` in vLLM's registry (``vllm_dar.plugin.register_backend_override``). It
  *is* the stock backend (subclass, same name, same builder) with an impl that stays stock for every layer of a
  model without a ``dar`` section. For a DAR model the impl moves its layer onto ``DarCpuWindowBackend`` at
  weight-loading time (``vllm_dar.plugin.common``).
* ``DarCpuWindowBackend``: the DAR layer's own (window) cache group; ``DarCpuFarBackend``: the companion far
  cache group. Both build their metadata with ``DarCpuMetadataBuilder`` (vLLM's int32 host tensors).
* ``DarCpuImpl``: stock CPU attention unless the served model has a ``dar`` section; for a DAR layer,
  ``do_kv_cache_update`` and ``forward`` are glue: metadata in, the ops of ``VLLM_DAR_OPS`` out.

``get_name()`` stays ``"CPU_ATTN"`` on all three backends: the Attention layer looks its backend up in the enum by
name, and the CPU platform only ever selects ``CPU_ATTN``.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_dar.patches import cpu_seeded_partial_prefill

from .common import DarBackend, DarFarBackend, DarImplMixin, DarMetadataBuilder, DarWindowBackend


class DarCpuBackend(CPUAttentionBackend):
    """Stock CPU attention, with an impl that moves DAR layers onto ``DarCpuWindowBackend``."""

    @staticmethod
    def get_impl_cls():
        return DarCpuImpl


class DarCpuMetadataBuilder(DarMetadataBuilder):
    """Offsets and block tables as views of vLLM's own int32 host tensors, which the C++ op takes as they are:
    a build is three slices, no copy. A DAR model has two cache groups per layer, each built every step, so a
    copy here is paid per group and step (README, "The recommended recipe's speed")."""

    @staticmethod
    def offsets(m: CommonAttentionMetadata, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return m.query_start_loc_cpu[: r + 1], m.seq_lens[:r]

    @staticmethod
    def table(m: CommonAttentionMetadata, r: int) -> torch.Tensor:
        return m.block_table_tensor[:r]


class _DarCpuBase(DarBackend):
    """The CPU platform's choices for its DAR cache groups."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_builder_cls():
        return DarCpuMetadataBuilder

    @staticmethod
    def get_impl_cls():
        return DarCpuImpl


class DarCpuWindowBackend(DarWindowBackend, _DarCpuBase):
    """A DAR layer on CPU: full-width window + sinks here, reduced K/V in its ``.dar_far`` companion."""


class DarCpuFarBackend(DarFarBackend, _DarCpuBase):
    """The far cache companion on CPU."""


class DarCpuImpl(DarImplMixin, CPUAttentionBackendImpl):
    """Stock CPU attention for a model without ``dar``; DAR attention with ``VLLM_DAR_OPS`` otherwise."""

    window_backend = DarCpuWindowBackend
    far_backend = DarCpuFarBackend

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A stock vLLM crash on CPU, for every model: here because this runs in the process of the CPU model runner.
        cpu_seeded_partial_prefill.install()
        self._init_dar()

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """key, value: [T, J, D]; see ``DarImplMixin._dar_write``."""
        if self.dar is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self._dar_write(key, value, kv_cache, slot_mapping, layer._k_scale_float, layer._v_scale_float)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query: [T, H, D] -> output [T, H, D]; K/V were stored by ``do_kv_cache_update``."""
        if self.dar is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        return self._dar_forward(query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale, layer._k_scale_float, layer._v_scale_float)
