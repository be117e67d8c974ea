"""KV cache specs of a DAR layer and the manager that keeps its sink tokens.

A DAR layer ``L`` owns two caches, both counted and paged by vLLM's hybrid allocator:

* ``L`` itself: a ``DarWindowSpec`` (a ``SlidingWindowSpec``) of full-width K/V. The stock sliding-window manager
  frees blocks as the window slides; ``DarWindowManager`` also keeps the blocks holding the first
  ``sink_tokens`` positions, so the sinks stay at full width in the same cache, same layout, one read path.
  The cost is ``cdiv(sink_tokens, block_size)`` blocks per request and layer, added to the admission bound.
  (A separate full-attention sink cache would allocate slots for every token of the sequence; a ring buffer
  spec disables prefix caching for the whole model.)
* ``L.dar_far``: a ``FullAttentionSpec`` whose key/value head sizes are the reduced ranks, one "head" per
  projection group, holding the reduced K/V of every token (``DarFarCache``, an unattached companion module,
  the pattern of vLLM's ``DeepseekV4SWACache``).

Registration goes through vLLM's ``KVCacheSpecRegistry`` (the extension point for out-of-tree specs) when this
module is imported: in the worker when the spec is built, in the engine core when the spec is unpickled.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry


@dataclass(frozen=True, kw_only=True)
class DarWindowSpec(SlidingWindowSpec):
    """Full-width K/V of the window plus the first ``sink_tokens`` positions (kept for the request's life)."""

    sink_tokens: int = 0

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window_blocks = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window_blocks + self.sink_blocks, cdiv(max_model_len, self.block_size) + 1)


class DarWindowManager(SlidingWindowManager):
    """``SlidingWindowManager`` that never frees (and, on a prefix-cache hit, requires) the sink blocks."""

    def __init__(self, kv_cache_spec: DarWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        skipped_blocks = self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size
        self._remove_blocks_in_range(request_id, self.sink_blocks, skipped_blocks)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
            alignment_tokens, dcp_world_size, pcp_world_size)
        sink_blocks = min(kv_cache_spec.sink_blocks, len(computed[0]))
        if sink_blocks == 0:
            return computed, hit_length
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, kv_cache_spec.block_size,
                                      supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
                                      alignment_tokens=alignment_tokens)
        for i in range(sink_blocks):
            if not computed[0][i].is_null:
                continue
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if not cached:  # the sinks were evicted: nothing of this prefix is usable
                return tuple([] for _ in kv_cache_group_ids), 0
            for blocks, block in zip(computed, cached):
                blocks[i] = block
        return computed, hit_length

    @classmethod
    def reachable_block_mask(cls, start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle, *args,
                             **kwargs):
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                                            *args, **kwargs)
        if mask is not None:  # sink blocks must be cached for any later hit to be usable
            for i in range(start_block, min(end_block, kv_cache_spec.sink_blocks)):
                mask[i - start_block] = True
        return mask

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence, total_computed_tokens: int, *args,
                                   **kwargs) -> int:
        n = super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                               total_computed_tokens, *args, **kwargs)
        if request_id in self.num_cached_block or not new_computed_blocks:
            return n
        skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        # Hit sink blocks inside the skipped prefix are touched too (see add_local_computed_blocks).
        return n + self._get_num_evictable_blocks(new_computed_blocks[: min(self.sink_blocks, skipped)])

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence,
                                  num_local_computed_tokens: int, num_external_computed_tokens: int) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        req_blocks = self.req_to_blocks[request_id]
        sinks = [b for b in new_computed_blocks[: self.sink_blocks]]
        missing = [i for i, b in enumerate(sinks) if req_blocks[i].is_null and not b.is_null]
        if missing and self.enable_caching:
            self.block_pool.touch([sinks[i] for i in missing])
            for i in missing:
                req_blocks[i] = sinks[i]


def _register() -> None:
    # Registering before vLLM's built-in specs would stop them from ever being registered
    # (KVCacheSpecRegistry._ensure_registered only runs on an empty registry).
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(DarWindowSpec, DarWindowManager, uniform_type_base_spec=SlidingWindowSpec)


_register()


def window_spec(layer, vllm_config: VllmConfig, *, window: int, sink_tokens: int) -> DarWindowSpec:
    """The DAR window spec of an ``Attention`` layer (installed as the layer's ``get_kv_cache_spec``)."""
    return DarWindowSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=layer.num_kv_heads,
                         head_size=layer.head_size, head_size_v=layer.head_size_v,
                         dtype=layer.kv_cache_torch_dtype, sliding_window=max(window, 1), sink_tokens=sink_tokens)


class DarFarCache(torch.nn.Module, AttentionLayerBase):
    """Companion layer ``f"{layer_name}.dar_far"``: the reduced K/V of every token of one DAR layer.

    Not attached to the model; registered in ``static_forward_context`` so vLLM allocates, binds and pages its
    cache like any attention layer. Cache: [num_blocks, groups, block_size, key_rank + value_rank].
    """

    def __init__(self, name: str, *, groups: int, key_rank: int, value_rank: int, dtype: torch.dtype,
                 static_forward_context: dict):
        super().__init__()
        from .backend import DarFarBackend

        self.layer_name, self.groups, self.key_rank, self.value_rank, self.dtype = (
            name, groups, key_rank, value_rank, dtype)
        self.backend_cls = DarFarBackend
        self.kv_cache = torch.tensor([])
        if name in static_forward_context:
            raise ValueError(f"Duplicate layer name: {name}")
        static_forward_context[name] = self

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return FullAttentionSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=self.groups,
                                 head_size=self.key_rank, head_size_v=self.value_rank, dtype=self.dtype)

    def get_attn_backend(self):
        return self.backend_cls

    def forward(self):  # never called: the DAR layer's impl reads and writes this cache
        raise RuntimeError(f"{self.layer_name} is a cache holder, not a callable layer")
