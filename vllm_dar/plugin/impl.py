"""The attention impl behind ``DarCpuBackend``: stock CPU attention unless the served model has a ``dar`` section.

For a DAR model each layer attaches its DAR state once its weights are loaded (``vllm_dar.plugin.attach``) and
moves onto ``DarWindowBackend``; ``do_kv_cache_update`` and ``forward`` are then glue: metadata in, the selected
ops out (``vllm_dar.ops.select_ops``).
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from .attach import DarImplMixin
from .backend import DarFarBackend, DarWindowBackend


class DarCpuImpl(DarImplMixin, CPUAttentionBackendImpl):
    window_backend = DarWindowBackend
    far_backend = DarFarBackend

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_dar()

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """key, value: [T, J, D]; see ``DarImplMixin._dar_write``."""
        if self.dar is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self._dar_write(key, value, kv_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query: [T, H, D] -> output [T, H, D]; K/V were stored by ``do_kv_cache_update``."""
        if self.dar is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        return self._dar_forward(query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
