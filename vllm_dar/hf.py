"""Hugging Face side: load a (DAR-converted) checkpoint and run it with the reference DAR attention.

The seam is transformers' ``AttentionInterface``: Llama-family attention modules call the registered function
with post-RoPE ``query [B, H, Tq, D]`` and full-width ``key/value [B, J, Tk, D]`` (the whole history when a KV
cache is used). Our function reads the module's DAR state from an attribute that the context managers below set
and always remove, so a model is only ever DAR (or capturing) inside a ``with`` block.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .config import SUPPORTED_ARCHITECTURES, DarConfig, DarConfigError, ModelShape
from .reference import LayerProjections, dar_attention_sdpa, select_kept

ATTN_NAME = "vllm_dar"
_STATE = "_vllm_dar_state"


def load_model(path: str, *, dtype: str | None = None):
    """Load a Llama-family checkpoint for CPU inference. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(path, "config.json")) as f:
        arch = (json.load(f).get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DarConfigError(f"architectures: {arch!r} is not supported ({', '.join(SUPPORTED_ARCHITECTURES)})")
    torch_dtype = "auto" if dtype is None else _torch_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def _torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"--dtype: {name!r} is not supported (float32, bfloat16)")
    return table[name]


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


def _attention_fn(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None, **kw):
    state = getattr(module, _STATE, None)
    if state is None:
        raise RuntimeError("vllm_dar attention called outside a dar_attention()/capture() context")
    # The mask is not read: the reference path runs unpadded batches, whose causal structure DAR's own masks hold.
    return state(module, query, key, value, scaling)


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _attention_fn)


@contextlib.contextmanager
def _attention_state(model, states: list[Callable]):
    """Route every layer's attention through ``states[i]`` for the duration of the block."""
    _register()
    mods = attention_modules(model)
    if len(mods) != len(states):
        raise DarConfigError(f"dar: {len(states)} layer settings for a model with {len(mods)} layers")
    previous = model.config._attn_implementation
    try:
        for mod, st in zip(mods, states):
            setattr(mod, _STATE, st)
        model.config._attn_implementation = ATTN_NAME
        for mod in model.modules():  # some modules keep their own reference to the config
            cfg = getattr(mod, "config", None)
            if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = ATTN_NAME
        yield model
    finally:
        model.config._attn_implementation = previous
        for mod in model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = previous
        for mod in mods:
            if hasattr(mod, _STATE):
                delattr(mod, _STATE)


def _dar_layer_fn(window: int, sink_tokens: int, proj: LayerProjections | None, kv_dtype: torch.dtype | None = None,
                  far_only: bool = False, budget=None, layer: int = 0, prompt_len: int | None = None,
                  far_block: int = 1):
    """One layer's attention. With a token ``budget`` (``vllm_dar.config.BudgetConfig``) the layer selects what
    its far cache keeps at the end of the prompt (``vllm_dar.reference.select_kept``, at the served far cache's
    ``far_block``) and hides the rest from later queries: ``prompt_len`` given, every call is one teacher-forced
    pass over prompt and continuation and selects from its own queries; ``None``, the first call is the prompt
    (a generation's prefill) and its selection holds for the calls after it."""
    made: dict = {}

    def fn(module, q, k, v, scaling):
        evicted, p_len = None, 0
        if budget is not None and proj is not None:
            p_len = prompt_len if prompt_len is not None else made.setdefault("prompt_len", k.shape[2])
            if prompt_len is not None or "evicted" not in made:
                if q.shape[2] != k.shape[2] or k.shape[2] < p_len:
                    raise RuntimeError(f"token budgets: the selecting call must hold the whole prompt ({p_len} "
                                       f"positions) as queries and keys, got {q.shape[2]} and {k.shape[2]}")
                made["evicted"] = select_kept(q, k, proj, budget, layer, window=window, sink_tokens=sink_tokens,
                                              prompt_len=p_len, scale=scaling, far_block=far_block)
            evicted = made["evicted"]
        out = dar_attention_sdpa(q, k, v, proj, window=window, sink_tokens=sink_tokens, scale=scaling,
                                 kv_dtype=kv_dtype, far_only=far_only, evicted=evicted, prompt_len=p_len)
        return out.transpose(1, 2).contiguous(), None  # transformers wants [B, Tq, H, D]
    return fn


@contextlib.contextmanager
def dar_attention_enabled(model, cfg: DarConfig | None, projections: list[LayerProjections] | None,
                          kv_dtype: torch.dtype | None = None, far_only: bool = False,
                          prompt_len: int | None = None):
    """Run ``model`` with reference DAR attention (``cfg=None``: standard attention through the same path);
    ``kv_dtype``: K/V read back as an FP8 KV cache of that dtype stores them (``far_only``: the reduced K/V
    only; ``dar_attention_sdpa``). A ``cfg`` with token budgets selects at the end of the prompt: at
    ``prompt_len`` in every forward pass (teacher-forced scoring), or, ``None``, at the end of the first forward
    pass of the block (one generation's prompt; ``_dar_layer_fn``); it keeps what the served far cache keeps,
    whose blocks are those of one process serving the model in its dtype (``DarConfig.far_block_tokens``)."""
    n = len(attention_modules(model))
    if cfg is None:
        states = [_dar_layer_fn(0, 0, None, kv_dtype) for _ in range(n)]
    else:
        itemsize = next(model.parameters()).dtype.itemsize
        far_blocks = cfg.far_block_tokens(window_itemsize=1 if kv_dtype is not None and not far_only else itemsize,
                                          far_itemsize=1 if kv_dtype is not None else itemsize)
        states = [_dar_layer_fn(cfg.window[i], cfg.sink_tokens, projections[i], kv_dtype, far_only, cfg.budget, i,
                                prompt_len, far_blocks[i]) for i in range(n)]
    with _attention_state(model, states):
        yield model


@contextlib.contextmanager
def capture(model, sink: Callable[[int, Tensor, Tensor, Tensor], None]):
    """Call ``sink(layer, q, k, v)`` with every layer's post-RoPE q [B,H,T,D] and k, v [B,J,T,D]."""
    def make(i):
        def fn(module, q, k, v, scaling):
            sink(i, q.detach(), k.detach(), v.detach())
            return _dar_layer_fn(0, 0, None)(module, q, k, v, scaling)
        return fn
    with _attention_state(model, [make(i) for i in range(len(attention_modules(model)))]):
        yield model


def model_shape(model) -> ModelShape:
    return ModelShape.from_hf_config(model.config)
