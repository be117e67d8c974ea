"""The attention impl behind ``DarCpuBackend``: stock CPU attention unless the served model has a ``dar`` section.

For a DAR model each layer, once its weights are loaded (and before vLLM collects KV cache specs):

1. registers its far cache companion ``f"{layer_name}.dar_far"`` (``vllm_dar.plugin.spec.DarFarCache``);
2. reports a ``DarWindowSpec`` (window + sinks, full width) instead of a full-attention spec, by installing
   ``spec.window_spec`` as the layer's ``get_kv_cache_spec`` (the layer builds its spec from its own fields;
   there is no backend hook for the spec type, ``customize_spec`` only sees a per-token probe spec);
3. moves the layer onto ``DarWindowBackend`` so its cache group gets our metadata builder.

``do_kv_cache_update`` and ``forward`` are glue: metadata in, the selected ops out (``VLLM_DAR_KERNELS``,
``vllm_dar.plugin.kernels``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from vllm_dar.ops.paged import PagedProjections

from .kernels import DarOps, select_ops
from .model import DarModel, check_engine, check_layer, log_summary, served_dar_model, shard_projections


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
    from .spec import dar_block_size, far_block_sizes

    cfg = model.cfg
    far = [cfg.layer(i).reduced_elems() // tp_size for i in range(cfg.shape.num_layers)]  # this rank's groups
    return far_block_sizes(dar_block_size(vllm_config), layer.num_kv_heads * (layer.head_size + layer.head_size_v),
                           far)


class DarCpuImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dar: DarLayer | None = None
        vllm_config = get_current_vllm_config()
        model_config = vllm_config.model_config
        self._dar_model: DarModel | None = served_dar_model(model_config) if model_config is not None else None
        if self._dar_model is not None:
            check_engine(vllm_config)
            self._vllm_config = vllm_config

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        if self._dar_model is not None and self.dar is None:
            self.dar = self._attach()

    def _attach(self) -> DarLayer:
        from .backend import DarWindowBackend
        from .spec import DarFarCache, dar_block_size, window_spec

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
                    static_forward_context=context)
        layer.get_kv_cache_spec = functools.partial(window_spec, layer, window=lay.window,
                                                    sink_tokens=lay.sink_tokens)
        layer.attn_backend = DarWindowBackend
        ops = select_ops()
        log_summary(vc.model_config.model, model, layer.kv_cache_torch_dtype.itemsize,
                    vc.model_config.max_model_len, kernels=ops.name, block_size=dar_block_size(vc))
        return DarLayer(index=index, far_name=far_name, window=lay.window, sink_tokens=lay.sink_tokens,
                        proj=PagedProjections.from_layer(proj, self.num_heads), ops=ops)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """key, value: [T, J, D]; kv_cache: the window cache [blocks, J, block_size, 2D]; also writes the
        reduced K/V [T, G, rk | rv] to the far cache through its own slot mapping."""
        if self.dar is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        ctx = get_forward_context()
        n = slot_mapping.shape[0]
        self.dar.ops.write(key[:n], value[:n], window_cache=kv_cache, window_slots=slot_mapping,
                           far_cache=ctx.no_compile_layers[self.dar.far_name].kv_cache,
                           far_slots=ctx.slot_mapping[self.dar.far_name][:n], proj=self.dar.proj)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query: [T, H, D] -> output [T, H, D]; K/V were stored by ``do_kv_cache_update``."""
        if self.dar is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
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
