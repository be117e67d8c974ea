"""KV cache specs of a DAR layer, and the manager that allocates its window cache sparsely.

A DAR layer ``L`` owns two caches, both counted and paged by vLLM's hybrid allocator from one block pool:

* ``L`` itself: a ``DarWindowSpec`` (a ``SlidingWindowSpec``) of full-width K/V. ``DarWindowManager`` gives a
  request real blocks only where full-width K/V will ever be read from the cache:

  - the blocks of the first ``sink_tokens`` positions (kept for the request's life);
  - the *tail*: the blocks holding the last ``w - 1`` positions after each step (what the next step's queries
    see at full width);
  - with prefix caching, the ``w - 1`` positions before the prompt's last cache-hit boundary, so a repeated
    prompt finds its window in the cache (vLLM's replay boundary; these blocks are freed to the cache once the
    window passes them).

  Every other block of the request's table is vLLM's null block. The current chunk's queries take their
  in-chunk keys and values at full width from the fresh K/V of the forward pass (``vllm_dar.ops``), so a
  4K-token prefill chunk never holds 4K full-width slots. This is what the stock sliding-window manager
  cannot do: it allocates the whole chunk, and vLLM's admission reserves ``w - 1 + max_num_batched_tokens``
  slots per request for it, as much as full attention at the CPU default of 4096 batched tokens.
  The per-request bound (sinks + two tails + the replay tail) is ``max_admission_blocks_per_request``: vLLM's
  logged capacity and its admission control both use it.
* ``L.dar_far``: a ``FullAttentionSpec`` whose key/value head sizes are the reduced ranks, one "head" per
  projection group, holding the reduced K/V of every token (``DarFarCache``, an unattached companion module,
  the pattern of vLLM's ``DeepseekV4SWACache``). Under per-layer token budgets (``vllm_dar.config.BudgetConfig``,
  PyramidKV/SnapKV-style) it is a ``DarFarSpec`` managed by ``DarFarManager``: once a request's prompt is
  processed (its prefill step compacted the kept candidates into the slots of ``[s0, c)``:
  ``vllm_dar.ops.paged.compact_prompts``), the blocks below ``s0`` are nulled and go back to vLLM's pool, so the
  scheduler admits more requests; reads start at the first real block (``vllm_dar.ops.paged.far_start``).
  Admission still counts a request's whole prompt (it is prefilled whole before anything is freed).

Block size: the window cache's waste is up to one block at each end of the tail and one for the sinks, so
DAR layers use small blocks (``VLLM_DAR_BLOCK_SIZE``, default 16 tokens) unless ``--block-size`` is given; the
far cache's block size is then scaled by vLLM's page-size unification (64 tokens at ranks 16/16 of 64).

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
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_dar import envs
from vllm_dar.config import RESERVED_TAILS, BudgetConfig, window_cache_blocks


@dataclass(frozen=True, kw_only=True)
class DarWindowSpec(SlidingWindowSpec):
    """Full-width K/V of the window plus the first ``sink_tokens`` positions (kept for the request's life)."""

    sink_tokens: int = 0
    replay_tail: bool = True  # prefix caching on: keep the window before the prompt's last hit boundary

    @property
    def sink_blocks(self) -> int:
        return window_cache_blocks(self.sliding_window, self.sink_tokens, self.block_size, tails=0)

    @property
    def tail_blocks(self) -> int:
        """Blocks a span of ``w - 1`` consecutive positions can touch (one more when it straddles a boundary)."""
        return window_cache_blocks(self.sliding_window, 0, self.block_size, tails=1)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        # Sinks, the tail after the step in flight and the one before it (freed once that step is processed),
        # and the replay tail. Independent of the chunk size: chunks are never held at full width.
        blocks = window_cache_blocks(self.sliding_window, self.sink_tokens, self.block_size,
                                     tails=RESERVED_TAILS + self.replay_tail)
        return min(blocks, cdiv(max_model_len, self.block_size) + 1)


class DarWindowManager(SlidingWindowManager):
    """Allocates only the sink, tail and replay-tail blocks of a request (see the module docstring); never frees
    (and, on a prefix-cache hit, requires) the sink blocks."""

    def __init__(self, kv_cache_spec: DarWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks
        self.tail_blocks = kv_cache_spec.tail_blocks
        self._prefill_end: dict[str, int] = {}  # request -> its prompt end, for the replay tail

    def _wanted(self, index: int, num_tokens: int, prefill_end: int) -> bool:
        """Whether block ``index`` of a request at ``num_tokens`` tokens needs a real block."""
        b, keep = self.block_size, self.sliding_window - 1  # positions [n - keep, n) are read by the next step
        lo, hi = index * b, (index + 1) * b
        if index < self.sink_blocks or hi > num_tokens - keep:
            return True
        if not self.enable_caching or prefill_end <= 1:
            return False
        boundary = (prefill_end - 1) // self.cache_hit_alignment_tokens * self.cache_hit_alignment_tokens
        return boundary > 0 and lo < boundary and hi > boundary - keep

    def _num_wanted(self, start: int, num_tokens: int, prefill_end: int) -> int:
        return sum(self._wanted(i, num_tokens, prefill_end) for i in range(start, cdiv(num_tokens, self.block_size)))

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        skipped_blocks = self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size
        self._remove_blocks_in_range(request_id, self.sink_blocks, skipped_blocks)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks: Sequence,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        self._prefill_end[request_id] = prefill_end
        held = self.req_to_blocks.get(request_id, ())
        start = len(held) if held else len(new_computed_blocks)
        n = self._num_wanted(start, num_tokens, prefill_end)
        if apply_admission_cap:
            n += self.tail_blocks  # the previous step's tail, held until that step is processed
        if request_id in self.num_cached_block or not new_computed_blocks:
            return n
        # Hit blocks that are touched leave the free queue: count the evictable ones (window and sinks).
        skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        touched = list(new_computed_blocks[skipped:]) + list(new_computed_blocks[: min(self.sink_blocks, skipped)])
        return n + self._get_num_evictable_blocks(touched)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        assert request_id not in self._partial_hit_reqs, "DAR window groups take whole-block hits only"
        req_blocks = self.req_to_blocks[request_id]
        start, end = len(req_blocks), cdiv(num_tokens, self.block_size)
        if end <= start:
            return []
        prefill_end = self._prefill_end.get(request_id, 0)
        wanted = [self._wanted(i, num_tokens, prefill_end) for i in range(start, end)]
        real = iter(self.block_pool.get_new_blocks(sum(wanted)))
        new_blocks = [next(real) if w else self._null_block for w in wanted]
        req_blocks.extend(new_blocks)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks if not b.is_null)
        return new_blocks

    def pop_blocks_for_free(self, request_id: str) -> list:
        self._prefill_end.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

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


@dataclass(frozen=True, kw_only=True)
class DarFarSpec(FullAttentionSpec):
    """A far cache under a token budget: one layer's budget (``budget_kind``, ``budget``, ``observation_window``
    of ``vllm_dar.config.BudgetConfig``) and what it depends on (the layer's ``window``, ``sink_tokens``).

    Layers with equal specs share a KV cache group (one block table; each compacts its own cache with the same
    span); ``merge`` (vLLM's attempt to put layers with different specs in one group) refuses with the
    ``ValueError`` vLLM reads as "incompatible": their kept spans differ (``FullAttentionSpec.merge`` would drop
    the budget fields)."""

    window: int
    sink_tokens: int
    budget_kind: str
    budget: float
    observation_window: int

    @classmethod
    def merge(cls, specs: list) -> DarFarSpec:
        if any(spec != specs[0] for spec in specs):
            raise ValueError("DAR far caches with different token budgets never share a KV cache group")
        return specs[0]

    def evict_below(self, prompt_len: int) -> int:
        """Tokens whose far slots a request frees after its ``prompt_len``-token prompt: ``s0`` of
        ``BudgetConfig.kept_span`` at this cache's block size (0: none)."""
        b = BudgetConfig(kind=self.budget_kind, per_layer=(self.budget,), observation_window=self.observation_window)
        return b.kept_span(0, prompt_len, self.window, self.sink_tokens, self.block_size)[0]


class DarFarManager(FullAttentionManager):
    """Full attention's manager, plus: once a request's prefill step is processed, the blocks below its kept
    span (``DarFarSpec.evict_below``) become null and go back to the pool (the step's compaction moved the kept
    candidates above them). The prompt end is the one vLLM's allocation reports when the request gets its
    first blocks (a new request: its prompt; a preempted one, recomputed: its tokens so far); no prefix caching."""

    def __init__(self, kv_cache_spec: DarFarSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._prompt_end: dict[str, int] = {}  # request -> its prefill's end, until its blocks below s0 are freed

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks: Sequence,
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, apply_admission_cap: bool = False,
                                   prefill_end: int = 0) -> int:
        if not self.req_to_blocks.get(request_id):  # no blocks yet: its prefill is this allocation's
            self._prompt_end[request_id] = prefill_end
        return super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                                  num_local_computed_tokens, num_tokens_main_model,
                                                  apply_admission_cap, prefill_end)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        end = self._prompt_end.get(request_id)
        if end is None or processed_computed_tokens < end:
            return
        del self._prompt_end[request_id]
        self._remove_blocks_in_range(request_id, 0, self.kv_cache_spec.evict_below(end) // self.block_size)

    def free(self, request_id: str) -> None:
        self._prompt_end.pop(request_id, None)
        super().free(request_id)


def _register() -> None:
    # Registering before vLLM's built-in specs would stop them from ever being registered
    # (KVCacheSpecRegistry._ensure_registered only runs on an empty registry).
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(DarWindowSpec, DarWindowManager, uniform_type_base_spec=SlidingWindowSpec)
    KVCacheSpecRegistry.register(DarFarSpec, DarFarManager, uniform_type_base_spec=FullAttentionSpec)


_register()


def dar_block_size(vllm_config: VllmConfig) -> int:
    """Tokens per window-cache block: ``--block-size`` when the user gave one, else ``VLLM_DAR_BLOCK_SIZE``
    (default 16; the CPU platform's default of 128 would hold up to 3 x 128 full-width slots per request)."""
    cache = vllm_config.cache_config
    if getattr(cache, "user_specified_block_size", False):
        return cache.block_size
    return envs.VLLM_DAR_BLOCK_SIZE


def window_spec(layer, vllm_config: VllmConfig, *, window: int, sink_tokens: int,
                dtype: torch.dtype) -> DarWindowSpec:
    """The DAR window spec of an ``Attention`` layer (installed as the layer's ``get_kv_cache_spec``); ``dtype``:
    what vLLM allocates the window cache as (the model dtype, or uint8 for FP8: ``vllm_dar.kv_dtype``)."""
    return DarWindowSpec(block_size=dar_block_size(vllm_config), num_kv_heads=layer.num_kv_heads,
                         head_size=layer.head_size, head_size_v=layer.head_size_v,
                         dtype=dtype, sliding_window=max(window, 1), sink_tokens=sink_tokens,
                         replay_tail=bool(vllm_config.cache_config.enable_prefix_caching))


class DarFarCache(torch.nn.Module, AttentionLayerBase):
    """Companion layer ``f"{layer_name}.dar_far"``: the reduced K/V of every token of one DAR layer.

    Not attached to the model; registered in ``static_forward_context`` so vLLM allocates, binds and pages its
    cache like any attention layer. Cache: [num_blocks, groups, block_size, key_rank + value_rank].
    """

    def __init__(self, name: str, *, groups: int, key_rank: int, value_rank: int, dtype: torch.dtype,
                 block_size: int, backend: type, static_forward_context: dict, budget: dict | None = None):
        super().__init__()
        self.layer_name, self.groups, self.key_rank, self.value_rank, self.dtype = (
            name, groups, key_rank, value_rank, dtype)
        self.budget = budget  # DarFarSpec's budget fields (window, sink_tokens, budget_kind, ...); None: no budget
        self.block_size = block_size  # from far_block_sizes: a window page's bytes, padded where they do not divide
        self.backend_cls = backend  # the platform's far backend: its builder makes this group's metadata
        self.kv_cache = torch.tensor([])
        if name in static_forward_context:
            raise ValueError(f"Duplicate layer name: {name}")
        static_forward_context[name] = self

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        spec = DarFarSpec if self.budget is not None else FullAttentionSpec
        return spec(block_size=self.block_size, num_kv_heads=self.groups, head_size=self.key_rank,
                    head_size_v=self.value_rank, dtype=self.dtype, **(self.budget or {}))

    def get_attn_backend(self):
        return self.backend_cls

    def forward(self):  # never called: the DAR layer's impl reads and writes this cache
        raise RuntimeError(f"{self.layer_name} is a cache holder, not a callable layer")
