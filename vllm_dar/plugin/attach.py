"""What every DAR attention impl shares: attaching DAR state to its layer, the cache write and the forward.

For a DAR model each layer, once its weights are loaded (and before vLLM collects KV cache specs):

1. registers its far cache companion ``f"{layer_name}.dar_far"`` (``vllm_dar.plugin.spec.DarFarCache``);
2. reports a ``DarWindowSpec`` (window + sinks, full width) instead of a full-attention spec, by installing
   ``spec.window_spec`` as the layer's ``get_kv_cache_spec`` (the layer builds its spec from its own fields;
   there is no backend hook for the spec type, ``customize_spec`` only sees a per-token probe spec);
3. moves the layer onto the impl's window backend so its cache group gets our metadata builder.

``DarCpuImpl`` (``vllm_dar.plugin.impl``: the CPU_ATTN override, stock for models without ``dar``) and
``DarCudaImpl`` (``vllm_dar.plugin.cuda``: vLLM's CUSTOM backend) mix ``DarImplMixin`` in. They differ only in
the backends their layers move onto (hence the metadata builder) and in the ops they run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index

from vllm_dar.ops.paged import PagedProjections

from vllm_dar.ops import DarOps, select_ops
from .model import DarModel, check_engine, check_layer, log_summary, served_dar_model, shard_projections
from .spec import DarFarCache, dar_block_size, far_block_sizes, window_spec


@dataclass(frozen=True)
class DarLayer:
    """What one DAR layer's forward needs."""

    index: int
    far_name: str
    window: int
    sink_tokens: int
    proj: PagedProjections
    ops: DarOps


def _far_block_sizes(vllm_config, model: DarModel, layer, tp_size: int) -> list[int]:
    cfg = model.cfg
    far = [cfg.layer(i).reduced_elems() // tp_size for i in range(cfg.shape.num_layers)]  # this rank's groups
    return far_block_sizes(dar_block_size(vllm_config), layer.num_kv_heads * (layer.head_size + layer.head_size_v),
                           far)


class DarImplMixin:
    """Mixed into an ``AttentionImpl`` subclass, listed before it (``process_weights_after_loading`` chains).

    The impl's ``__init__`` calls ``_init_dar()`` after its base's; its ``do_kv_cache_update`` / ``forward`` call
    ``_dar_write`` / ``_dar_forward`` for DAR layers (``self.dar`` is set once weights are loaded).
    """

    window_backend: ClassVar[type]  # the backend a DAR layer moves onto (its window cache group's builder)
    far_backend: ClassVar[type]  # the backend of the far cache companion
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
        DarFarCache(far_name, groups=proj.groups, key_rank=lay.key_rank, value_rank=lay.value_rank,
                    dtype=layer.kv_cache_torch_dtype, block_size=_far_block_sizes(vc, model, layer, tp_size)[index],
                    backend=self.far_backend, static_forward_context=context)
        layer.get_kv_cache_spec = functools.partial(window_spec, layer, window=lay.window,
                                                    sink_tokens=lay.sink_tokens)
        layer.attn_backend = self.window_backend
        ops = select_ops(self.ops_kind)
        log_summary(vc.model_config.model, model, layer.kv_cache_torch_dtype.itemsize,
                    vc.model_config.max_model_len, kernels=ops.name, block_size=dar_block_size(vc))
        device = layer._k_scale.device  # the layer's buffers live where its KV cache will (the worker's device)
        return DarLayer(index=index, far_name=far_name, window=lay.window, sink_tokens=lay.sink_tokens,
                        proj=PagedProjections.from_layer(proj, self.num_heads).to(device), ops=ops)

    def _dar_write(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
        """key, value: [T, J, D]; kv_cache: the window cache [blocks, J, block_size, 2D]; also writes the
        reduced K/V [T, G, rk | rv] to the far cache through its own slot mapping."""
        ctx = get_forward_context()
        n = slot_mapping.shape[0]
        self.dar.ops.write(key[:n], value[:n], window_cache=kv_cache, window_slots=slot_mapping,
                           far_cache=ctx.no_compile_layers[self.dar.far_name].kv_cache,
                           far_slots=ctx.slot_mapping[self.dar.far_name][:n], proj=self.dar.proj)

    def _dar_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                     attn_metadata, output: torch.Tensor, output_scale=None,
                     output_block_scale=None) -> torch.Tensor:
        """query: [T, H, D] -> output [T, H, D]; K/V were stored by ``_dar_write``."""
        if attn_metadata is None:  # warm-up / profiling run
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm-dar: fused output quantization is not supported")
        ctx = get_forward_context()
        far = ctx.attn_metadata[self.dar.far_name]
        n = attn_metadata.num_actual_tokens
        self.dar.ops.attend(query[:n], key[:n], value[:n], output[:n], window_cache=kv_cache,
                            window_table=attn_metadata.block_table,
                            far_cache=ctx.no_compile_layers[self.dar.far_name].kv_cache,
                            far_table=far.block_table, query_start_loc=attn_metadata.query_start_loc,
                            seq_lens=attn_metadata.seq_lens, proj=self.dar.proj, window=self.dar.window,
                            sink_tokens=self.dar.sink_tokens, scale=self.scale)
        return output
