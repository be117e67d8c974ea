"""What the CPU and CUDA platforms share: the metadata, its builder, the backend roles and the DAR impl mixin.

A DAR layer ``L`` serves from two cache groups (``vllm_dar.plugin.spec``): its own window cache and the far
cache of its companion ``f"{L}.dar_far"``. vLLM gives each group the metadata builder of the backend its layers
name, so a platform module (``cpu``, ``cuda``) defines, on top of the classes here:

* a platform base: a ``DarBackend`` subclass naming its registry slot (``get_name``), its metadata builder (a
  ``DarMetadataBuilder`` subclass choosing where the offsets live) and its impl (a ``DarImplMixin`` subclass);
* its window and far backends: ``class X(DarWindowBackend, PlatformBase)`` / ``class Y(DarFarBackend,
  PlatformBase)``, the role first so that it overrides the platform base;
* its impl, below its backends in the same module: the backends name it at call time, the impl names them as
  class attributes, and no module imports one that imports it back.

For a DAR model each layer, once its weights are loaded (and before vLLM collects KV cache specs), attaches its
DAR state (``DarImplMixin._attach``):

1. registers its far cache companion ``f"{layer_name}.dar_far"`` (``vllm_dar.plugin.spec.DarFarCache``) on the
   impl's ``far_backend``;
2. reports a ``DarWindowSpec`` (window + sinks, full width) instead of a full-attention spec, by installing
   ``spec.window_spec`` as the layer's ``get_kv_cache_spec`` (the layer builds its spec from its own fields;
   there is no backend hook for the spec type, ``customize_spec`` only sees a per-token probe spec);
3. moves the layer onto the impl's ``window_backend`` so its cache group gets the platform's metadata builder.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_reduce
from vllm.forward_context import ForwardContext, get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm_dar.config import BudgetConfig, DarConfigError
from vllm_dar.kv_dtype import KV_CACHE_DTYPES, cache_dtypes
from vllm_dar.ops import DarOps, cpp, select_ops
from vllm_dar.ops.paged import PagedProjections, compact_prompts, null_below, reduce_tokens, write_slots

from .model import DarModel, check_engine, check_layer, log_summary, served_dar_model, shard_projections
from .spec import DarFarCache, dar_block_size, window_spec


@dataclass
class DarMetadata:
    """Per-batch metadata of one DAR cache group (window or far), R requests in the batch.

    ``query_start_loc`` and ``seq_lens`` are host lists or tensors (the CPU ops) or device tensors (the Triton
    ops), as the platform's builder chooses (``DarMetadataBuilder.offsets``).
    """

    num_actual_tokens: int  # T: tokens of this step (the leading rows of query/key/value/output)
    query_start_loc: list[int] | torch.Tensor  # R + 1 token offsets of each request's queries
    seq_lens: list[int] | torch.Tensor  # R: cached + scheduled tokens per request
    block_table: torch.Tensor  # [R, max_blocks] block ids of this group
    is_prefilling: torch.Tensor | None = None  # [R] host bool: the request's prompt is (still) being prefilled


class DarMetadataBuilder(AttentionMetadataBuilder[DarMetadata]):
    """Builds ``DarMetadata`` for one cache group from vLLM's common metadata; a platform subclass defines
    ``offsets`` and may override ``table``."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # vLLM declares __init__ abstract

    @staticmethod
    def offsets(m: CommonAttentionMetadata, r: int) -> tuple[list[int] | torch.Tensor, list[int] | torch.Tensor]:
        """``(query_start_loc[: r + 1], seq_lens[:r])`` where the platform's ops want them."""
        raise NotImplementedError

    @staticmethod
    def table(m: CommonAttentionMetadata, r: int) -> torch.Tensor:
        """The group's block table ``[r, max_blocks]`` as the platform's ops want it (default: vLLM's, no copy)."""
        return m.block_table_tensor[:r]

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DarMetadata:
        m, r = common_attn_metadata, common_attn_metadata.num_reqs
        query_start_loc, seq_lens = self.offsets(m, r)
        return DarMetadata(num_actual_tokens=m.num_actual_tokens, query_start_loc=query_start_loc,
                           seq_lens=seq_lens, block_table=self.table(m, r),
                           is_prefilling=None if m.is_prefilling is None else m.is_prefilling[:r])


class DarBackend(AttentionBackend):
    """What every DAR backend declares to vLLM; a platform subclass adds ``get_name``, ``get_builder_cls`` and
    ``get_impl_cls`` (see the module docstring)."""

    forward_includes_kv_cache_update: bool = False  # vLLM calls the impl's do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = list(KV_CACHE_DTYPES)  # vllm_dar.kv_dtype (check_engine)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(1)]  # every op reads any block size: never split allocator blocks

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # [blocks, heads, block_size, k + v]: see vllm_dar.ops.paged

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any head size


class DarWindowBackend(DarBackend):
    """Role of a DAR layer's own cache group: full-width window + sinks (a sliding-window spec), reduced K/V in
    its ``.dar_far`` companion. Its impl is the platform's."""

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True


class DarFarBackend(DarBackend):
    """Role of the far cache companion's group: written and read by its DAR layer's impl, never run on its own."""

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the DAR far cache has no attention impl of its own")


@dataclass(frozen=True)
class DarLayer:
    """What one DAR layer's forward needs (set once its weights are loaded)."""

    index: int  # the layer's index in the dar section
    far_name: str  # its far cache companion's name in the forward context
    window: int
    sink_tokens: int
    proj: PagedProjections  # this tensor-parallel rank's projections, on the layer's device
    ops: DarOps  # the cache write and attention it runs
    window_dtype: torch.dtype | None  # FP8 dtype the window cache is read as (vLLM allocates it uint8); None: as given
    far_dtype: torch.dtype | None  # the same for the far cache (vllm_dar.kv_dtype.cache_dtypes)
    all_reduce_far: bool  # the projection group spans the tensor-parallel ranks: reduced K/V are partial sums
    budget: BudgetConfig | None = None  # token budgets: compact each prompt's far cache after its prefill step


def write_across_ranks(ops: DarOps, key: torch.Tensor, value: torch.Tensor, *, window_cache: torch.Tensor,
                       window_slots: torch.Tensor, far_cache: torch.Tensor, far_slots: torch.Tensor,
                       proj: PagedProjections, k_scale: float, v_scale: float, all_reduce) -> None:
    """One rank's cache write where one projection group spans the tensor-parallel ranks (``joint``): ``ops``
    writes this rank's heads' full-width K/V [T, J / tp, D] to its window cache; the far cache takes the group's
    reduced K/V, the sum over the ranks of each one's partial projection (``proj``: its rows of the group's
    ``k_down`` / ``v_down``, ``shard_projections``), in fp32, then stored as ``write_slots`` stores them (FP8
    caches quantized). ``all_reduce``: [T, 1, rk + rv] fp32 -> the sum over the ranks, a collective every rank
    calls once per layer and step, in the same order. The op, given no far slots, still reduces the K/V it does
    not store: the reduction runs twice (a window-only write mode would save it)."""
    ops.write(key, value, window_cache=window_cache, window_slots=window_slots, far_cache=far_cache,
              far_slots=torch.full_like(far_slots, -1), proj=proj, k_scale=k_scale, v_scale=v_scale)
    rk = proj.k_down.shape[-1]
    reduced = all_reduce(torch.cat([reduce_tokens(key, proj.k_down), reduce_tokens(value, proj.v_down)], dim=-1))
    write_slots(far_cache, far_slots, reduced[..., :rk], reduced[..., rk:], k_scale, v_scale)


class DarImplMixin:
    """Mixed into an ``AttentionImpl`` subclass, listed before it (``process_weights_after_loading`` chains).

    The impl's ``__init__`` calls ``_init_dar()`` after its base's; its ``do_kv_cache_update`` / ``forward`` call
    ``_dar_write`` / ``_dar_forward`` for DAR layers (``self.dar`` is set once weights are loaded). Subclasses
    differ only in the backends their layers move onto (hence the metadata builder) and in the ops they run.
    """

    window_backend: ClassVar[type[DarWindowBackend]]  # the backend a DAR layer moves onto
    far_backend: ClassVar[type[DarFarBackend]]  # the backend of the far cache companion
    ops_kind: ClassVar[str | None] = None  # ``select_ops`` kind; None: ``VLLM_DAR_OPS``

    def _init_dar(self) -> DarModel | None:
        """The served model's DAR state (None without a ``dar`` section); refuses unsupported engine settings."""
        self.dar: DarLayer | None = None
        vllm_config = get_current_vllm_config()
        model_config = vllm_config.model_config
        self._dar_model = served_dar_model(model_config) if model_config is not None else None
        if self._dar_model is not None:
            check_engine(vllm_config)
            self._vllm_config = vllm_config
        return self._dar_model

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        if self._dar_model is not None and self.dar is None:
            self.dar = self._attach()

    def _attach(self) -> DarLayer:
        vc, model = self._vllm_config, self._dar_model
        context = vc.compilation_config.static_forward_context
        name, layer = next((n, m) for n, m in context.items() if getattr(m, "impl", None) is self)
        index = extract_layer_index(name)
        tp_size = vc.parallel_config.tensor_parallel_size
        check_layer(self, model, index, tp_size)
        lay = model.cfg.layer(index)
        proj = shard_projections(model.projections[index], tp_size, get_tensor_model_parallel_rank())
        far_name = f"{name}.dar_far"
        window_dtype, far_dtype = cache_dtypes(vc.cache_config.cache_dtype)

        def storage(dt):  # what vLLM allocates a cache as: FP8 ones uint8 (the layer's), the others the model dtype
            return vc.model_config.dtype if dt is None else layer.kv_cache_torch_dtype

        window_storage, far_storage = storage(window_dtype), storage(far_dtype)
        far_block = model.cfg.far_block_tokens(dar_block_size(vc), window_storage.itemsize, far_storage.itemsize,
                                               tp_size)[index]
        budget = model.cfg.budget
        far_budget = None if budget is None else {
            "window": lay.window, "sink_tokens": lay.sink_tokens, "budget_kind": budget.kind,
            "budget": budget.per_layer[index], "observation_window": budget.observation_window}
        DarFarCache(far_name, groups=proj.groups, key_rank=lay.key_rank, value_rank=lay.value_rank,
                    dtype=far_storage, block_size=far_block, backend=self.far_backend,
                    static_forward_context=context, budget=far_budget)
        layer.get_kv_cache_spec = functools.partial(window_spec, layer, window=lay.window,
                                                    sink_tokens=lay.sink_tokens, dtype=window_storage)
        layer.attn_backend = self.window_backend
        ops = select_ops(self.ops_kind)
        all_reduce_far = model.cfg.far_shards(tp_size) != tp_size
        if all_reduce_far and ops.name == "triton":
            raise DarConfigError(f"vllm-dar: tensor_parallel_size={tp_size} with joint projections: the ranks' "
                                 "far-cache write (write_across_ranks) synchronises with the host, which CUDA graphs "
                                 "cannot capture; convert with --head-sharing per_head for tensor parallelism on GPUs")
        if budget is not None and ops.name == "triton":
            raise DarConfigError("vllm-dar: dar.budget: token budgets are served by the CPU ops (cpp, reference); "
                                 "the Triton kernels do not read compacted far caches yet. Remove the budgets to "
                                 "serve this checkpoint here: vllm-dar budget MODEL --clear")
        if budget is not None and lay.sink_tokens < 1:
            raise DarConfigError("vllm-dar: dar.budget with sink_tokens=0: token budgets need sink_tokens >= 1 (a "
                                 "request's sink block, held for its life, is how each step finds its compacted "
                                 "far cache again); convert with --sink-tokens 1 or more")
        if budget is not None and tp_size != 1:
            raise DarConfigError(f"vllm-dar: dar.budget with tensor_parallel_size={tp_size}: token budgets are served "
                                 "on one rank only (each rank would select on its own heads); use 1")
        if far_dtype is not None and ops.name == "triton":
            raise DarConfigError(f"vllm-dar: kv_cache_dtype={vc.cache_config.cache_dtype!r}: the DAR Triton "
                                 "kernels read caches in the model dtype only; use 'auto' on this platform")
        if window_dtype is not None and ops.name == "cpp" and not (
                cpp.simd() != "none" and self.head_size % 16 == 0 and self.head_size <= 128):
            raise DarConfigError(f"vllm-dar: kv_cache_dtype={vc.cache_config.cache_dtype!r} with "
                                 "VLLM_DAR_FP8_WINDOW=1: the C++ DAR op reads an FP8 window cache with AVX-512 or "
                                 f"AVX2 and head_dim a multiple of 16, <= 128 (here {cpp.simd()}, head_dim "
                                 f"{self.head_size}); unset VLLM_DAR_FP8_WINDOW (far cache only in FP8) or use "
                                 "VLLM_DAR_OPS=reference (anywhere, slowly)")
        log_summary(vc.model_config.model, model, window_storage.itemsize, vc.model_config.max_model_len,
                    ops=ops.name, block_size=dar_block_size(vc), tp_size=tp_size, far_bytes=far_storage.itemsize)
        device = layer._k_scale.device  # the layer's buffers live where its KV cache will (the worker's device)
        return DarLayer(index=index, far_name=far_name, window=lay.window, sink_tokens=lay.sink_tokens,
                        proj=PagedProjections.from_layer(proj, self.num_heads).to(device), ops=ops,
                        window_dtype=window_dtype, far_dtype=far_dtype, all_reduce_far=all_reduce_far,
                        budget=budget)

    def _caches(self, window_cache: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (window cache, far cache), as the ops read them (FP8 views of vLLM's uint8 tensors);
        ``ctx``: the step's forward context."""
        far = ctx.no_compile_layers[self.dar.far_name].kv_cache
        wd, fd = self.dar.window_dtype, self.dar.far_dtype
        return (window_cache if wd is None else window_cache.view(wd)), (far if fd is None else far.view(fd))

    def _dar_write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """key, value: [T, J, D]; kv_cache: the window cache [blocks, J, block_size, 2D]; also writes the
        reduced K/V [T, G, rk | rv] to the far cache through its own slot mapping. ``k_scale`` / ``v_scale``:
        the layer's, for FP8 caches (``vllm_dar.kv_dtype``).

        Where the projection group spans the tensor-parallel ranks (``all_reduce_far``): ``write_across_ranks``
        with vLLM's tensor-parallel all-reduce."""
        ctx = get_forward_context()
        n = slot_mapping.shape[0]
        window_cache, far_cache = self._caches(kv_cache, ctx)
        far_slots = ctx.slot_mapping[self.dar.far_name][:n]
        if self.dar.all_reduce_far:
            write_across_ranks(self.dar.ops, key[:n], value[:n], window_cache=window_cache,
                               window_slots=slot_mapping, far_cache=far_cache, far_slots=far_slots,
                               proj=self.dar.proj, k_scale=k_scale, v_scale=v_scale,
                               all_reduce=tensor_model_parallel_all_reduce)
            return
        self.dar.ops.write(key[:n], value[:n], window_cache=window_cache, window_slots=slot_mapping,
                           far_cache=far_cache, far_slots=far_slots, proj=self.dar.proj, k_scale=k_scale,
                           v_scale=v_scale)

    def _dar_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                     attn_metadata: DarMetadata | None, output: torch.Tensor, output_scale=None,
                     output_block_scale=None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """query: [T, H, D], key/value: [T, J, D] -> output [T, H, D]; K/V were stored by ``_dar_write`` (with the
        same scales). Rows past ``attn_metadata.num_actual_tokens`` (padding) are left as they are."""
        if attn_metadata is None:  # warm-up / profiling run
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-dar: fused output quantization is not supported")
        ctx = get_forward_context()
        far = ctx.attn_metadata[self.dar.far_name]
        n = attn_metadata.num_actual_tokens
        window_cache, far_cache = self._caches(kv_cache, ctx)
        budget = self.dar.budget is not None and attn_metadata.is_prefilling is not None
        far_table = self._budget_far_table(far.block_table, attn_metadata, far_cache) if budget else far.block_table
        self.dar.ops.attend(query[:n], key[:n], value[:n], output[:n], window_cache=window_cache,
                            window_table=attn_metadata.block_table, far_cache=far_cache,
                            far_table=far_table, query_start_loc=attn_metadata.query_start_loc,
                            seq_lens=attn_metadata.seq_lens, proj=self.dar.proj, window=self.dar.window,
                            sink_tokens=self.dar.sink_tokens, scale=self.scale, k_scale=k_scale,
                            v_scale=v_scale)
        if budget and bool(attn_metadata.is_prefilling.any()):
            starts = compact_prompts(
                query[:n], far_cache=far_cache, far_table=far.block_table, query_start_loc=attn_metadata.query_start_loc,
                seq_lens=attn_metadata.seq_lens, is_prefilling=attn_metadata.is_prefilling, proj=self.dar.proj,
                budget=self.dar.budget, layer=self.dar.index, window=self.dar.window,
                sink_tokens=self.dar.sink_tokens, scale=self.scale, k_scale=k_scale)
            for row, s0 in starts.items():
                self._kept_from[int(attn_metadata.block_table[row, 0])] = s0
        return output

    def _budget_far_table(self, far_table: torch.Tensor, window: DarMetadata, far_cache: torch.Tensor) -> torch.Tensor:
        """The far table this layer's attention reads under token budgets: a copy in which each compacted
        request's blocks below its kept span (``compact_prompts``) are the null block. vLLM tells a worker only of
        blocks added to a request, so its table still lists the blocks the scheduler freed (and may have given to
        another request). A request is found again across steps by its first window-cache block, its sinks' (held
        for its life, so no other running request has it; ``sink_tokens >= 1`` is required): ``_kept_from`` maps
        that block to the request's kept span start, written when its prompt is compacted, which overwrites what
        an earlier owner of the block left. A request being prefilled reads its whole far cache."""
        if getattr(self, "_kept_from", None) is None:  # [blocks of the pool] int32: kept span start (0: none)
            self._kept_from = torch.zeros(far_cache.shape[0], dtype=torch.int32)
        starts = self._kept_from[window.block_table[:, 0].long()]
        starts = starts.masked_fill(window.is_prefilling, 0)
        return null_below(far_table, starts, far_cache.shape[2])
