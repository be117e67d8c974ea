"""The served model's DAR state: config and projections loaded once per process, settings checked at start-up.

Every refusal names the setting and the value, and happens while the model is built (before any KV cache is
allocated), so an unsupported launch fails at start-up rather than serving wrong tokens.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

from vllm_dar.checkpoint import load_dar
from vllm_dar.config import DarConfig, DarConfigError
from vllm_dar.kv_dtype import KV_CACHE_DTYPES
from vllm_dar.reference import LayerProjections

logger = logging.getLogger("vllm.vllm_dar")  # under "vllm": shown by vLLM's own log handler


@dataclass(frozen=True)
class DarModel:
    """A served checkpoint's validated ``dar`` section and its per-layer projections (all KV heads)."""

    cfg: DarConfig
    projections: tuple[LayerProjections, ...]


def has_dar_section(hf_config) -> bool:
    """Whether the model's ``config.json`` has a ``dar`` key, whatever its value: a ``"dar": null`` is a malformed
    section (refused by the loader), not a stock model."""
    return hasattr(hf_config, "dar")


def served_dar_model(model_config) -> DarModel | None:
    """The served model's DAR state, or None for a model without a ``dar`` section (served as stock)."""
    if not has_dar_section(model_config.hf_config):
        return None
    return dar_model(model_directory(model_config.model, getattr(model_config, "revision", None)))


def model_directory(model: str, revision: str | None = None) -> str:
    """The local directory holding ``model``'s files: the path itself, or its snapshot in the Hugging Face cache
    (``HF_HUB_CACHE``; the revision vLLM was asked for). Never downloads: vLLM already fetched the model."""
    if os.path.isfile(os.path.join(model, "config.json")):
        return model
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        raise DarConfigError(f"vllm-dar: model {model!r} has a dar section, but neither a local directory nor "
                             f"a snapshot in the Hugging Face cache holds its files ({e})") from e


@functools.lru_cache(maxsize=4)
def dar_model(model_dir: str) -> DarModel | None:
    """The DAR config and projections of the checkpoint at ``model_dir`` (validated), or None without ``dar``."""
    cfg, projections = load_dar(model_dir)
    if cfg is None:
        return None
    return DarModel(cfg, tuple(projections))


def has_budget(hf_config) -> bool:
    """Whether the model's ``dar`` section sets token budgets (read from vLLM's config, before any loading)."""
    dar = getattr(hf_config, "dar", None)
    return isinstance(dar, dict) and dar.get("budget") is not None


def configure_budgets(vllm_config) -> None:
    """A model with token budgets compacts each prompt's far cache at the end of the step that prefilled it
    (``vllm_dar.ops.paged.compact_prompts``), so that step must hold the whole prompt and its far blocks must be
    its own: chunked prefill and prefix caching go off for it (logged), and ``max_num_batched_tokens`` is raised
    to ``max_model_len`` where it was below (what vLLM's CPU platform does for MLA models without chunked
    prefill). Runs while vLLM builds its config (``vllm_dar.patches.dar_backend_selection``); other models are
    untouched."""
    model_config = vllm_config.model_config
    if model_config is None or not has_budget(model_config.hf_config):
        return
    sched, cache = vllm_config.scheduler_config, vllm_config.cache_config
    changed = []
    if sched.enable_chunked_prefill:
        sched.enable_chunked_prefill = False
        changed.append("chunked prefill off")
    if cache.enable_prefix_caching:
        cache.enable_prefix_caching = False
        changed.append("prefix caching off")
    if sched.max_num_batched_tokens < model_config.max_model_len:
        changed.append(f"max_num_batched_tokens {sched.max_num_batched_tokens} -> {model_config.max_model_len}")
        sched.max_num_batched_tokens = model_config.max_model_len
    if changed:
        logger.warning("vllm-dar: %s has token budgets (dar.budget): %s (each prompt is prefilled in one step, "
                       "then its far cache is compacted)", model_config.model, ", ".join(changed))


def check_engine(vllm_config) -> None:
    """Refuse engine settings the DAR path does not implement (raises DarConfigError)."""
    cache, parallel = vllm_config.cache_config, vllm_config.parallel_config
    pp = parallel.pipeline_parallel_size
    sched = vllm_config.scheduler_config
    budget = vllm_config.model_config is not None and has_budget(vllm_config.model_config.hf_config)
    checks = [
        (budget and (sched.enable_chunked_prefill or cache.enable_prefix_caching or sched.async_scheduling),
         ("dar.budget: token budgets need chunked prefill, prefix caching and async scheduling off (each prompt "
          "prefilled in one step, then compacted; vllm_dar.plugin.model.configure_budgets sets this when vLLM "
          f"builds its config), got enable_chunked_prefill={sched.enable_chunked_prefill}, enable_prefix_caching="
          f"{cache.enable_prefix_caching}, async_scheduling={sched.async_scheduling}")),
        (cache.cache_dtype not in KV_CACHE_DTYPES,
         (f"kv_cache_dtype={cache.cache_dtype!r}: the DAR backend stores K/V in the model dtype or in FP8; use "
          f"one of {', '.join(KV_CACHE_DTYPES)}")),
        (pp != 1, f"pipeline_parallel_size={pp}: not supported by the DAR backend; use 1"),
        (vllm_config.speculative_config is not None, "speculative decoding is not supported by the DAR backend"),
        (getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", False),
         "disable_hybrid_kv_cache_manager=True: DAR needs the hybrid KV cache manager (window + far caches)"),
    ]
    for bad, message in checks:
        if bad:
            raise DarConfigError(f"vllm-dar: {message}")


def select_cuda_backend(vllm_config, *, on_cuda: bool) -> None:
    """On CUDA, serve a model with a ``dar`` section with the DAR backend (vLLM's CUSTOM slot): select it when no
    backend was asked for, refuse any other (it would run full attention, uncompressed). No-op elsewhere.
    Runs while vLLM builds its config (``vllm_dar.patches.dar_backend_selection``)."""
    model_config = vllm_config.model_config
    if not on_cuda or model_config is None or not has_dar_section(model_config.hf_config):
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from . import CUDA_BACKEND

    attn, custom = vllm_config.attention_config, AttentionBackendEnum.CUSTOM
    fix = "pass --attention-backend CUSTOM (vllm-dar's DAR backend) or leave --attention-backend unset"
    holder = custom.get_path() if custom.is_overridden() else None
    if holder != CUDA_BACKEND:
        raise DarConfigError(f"vllm-dar: {model_config.model} has a dar section, but vLLM's CUSTOM attention "
                             f"backend is {holder}, not vllm-dar's; uninstall the plugin that took it")
    if attn.backend_per_kind:
        raise DarConfigError(f"vllm-dar: {model_config.model} has a dar section: attention_config."
                             f"backend_per_kind={attn.backend_per_kind} is not supported; {fix}")
    if attn.backend is None:
        attn.backend = custom
        logger.info("vllm-dar: %s has a dar section: attention backend CUSTOM (DAR, Triton kernels)",
                    model_config.model)
    elif attn.backend != custom:
        raise DarConfigError(f"vllm-dar: {model_config.model} has a dar section, but --attention-backend "
                             f"{attn.backend.name} would serve it with full attention (uncompressed); {fix}")


def shard_projections(p: LayerProjections, tp_size: int, rank: int) -> LayerProjections:
    """This tensor-parallel rank's projections: those of its KV heads (vLLM gives rank r the query heads and KV
    heads [r * n / tp, (r + 1) * n / tp)).

    Where each rank owns whole projection groups (``per_head``), the groups of its heads. Where one group spans
    the ranks (``joint``: G = 1), ``q_proj`` / ``v_up`` of its heads and the rows of ``k_down`` / ``v_down`` that
    read its heads: its reduced K/V are then partial sums, which the ranks all-reduce before storing them
    (``DarConfig.far_shards`` is 1); each rank's far cache holds the whole group. Several groups that span ranks
    are refused (no such head sharing exists)."""
    if tp_size == 1:
        return p
    j, g = p.num_kv_heads, p.groups
    if j % tp_size:
        raise DarConfigError(f"vllm-dar: tensor_parallel_size={tp_size} does not divide the {j} KV heads (vLLM "
                             "would replicate them); DAR projections shard by KV head")
    local_heads, heads_per_group = j // tp_size, j // g
    js = slice(rank * local_heads, (rank + 1) * local_heads)
    if g % tp_size:  # a group spans ranks
        if g != 1:
            raise DarConfigError(f"vllm-dar: tensor_parallel_size={tp_size}: {g} projection groups of "
                                 f"{heads_per_group} KV heads each span ranks of {local_heads}; only one group "
                                 "per layer (joint) is split across ranks")
        d = p.k_down.shape[1] // j
        rows = slice(rank * local_heads * d, (rank + 1) * local_heads * d)
        return LayerProjections(q_proj=p.q_proj[js], k_down=p.k_down[:, rows], v_down=p.v_down[:, rows],
                                v_up=p.v_up[js])
    local_groups = local_heads // heads_per_group
    gs = slice(rank * local_groups, (rank + 1) * local_groups)
    return LayerProjections(q_proj=p.q_proj[js], k_down=p.k_down[gs], v_down=p.v_down[gs], v_up=p.v_up[js])


def check_layer(impl, model: DarModel, layer_index: int, tp_size: int = 1) -> None:
    """Refuse attention features the DAR path does not implement, for one layer (raises DarConfigError)."""
    shape = model.cfg.shape
    ours = (impl.num_heads * tp_size, impl.num_kv_heads * tp_size, impl.head_size)
    theirs = (shape.num_heads, shape.num_kv_heads, shape.head_dim)
    checks = [
        (impl.attn_type != "decoder", f"attention type {impl.attn_type!r}: only decoder attention"),
        (impl.sliding_window != -1, f"model sliding window {impl.sliding_window}: not combined with DAR"),
        (impl.alibi_slopes is not None, "ALiBi: not supported"),
        (bool(impl.logits_soft_cap), f"logits_soft_cap={impl.logits_soft_cap}: not supported"),
        (impl.sinks is not None, "learned attention sinks: not supported"),
        (ours != theirs, f"heads/kv_heads/head_size {ours} differ from the dar section's {theirs}"),
        (not 0 <= layer_index < shape.num_layers,
         f"layer index {layer_index} outside the dar section's {shape.num_layers} layers"),
    ]
    for bad, message in checks:
        if bad:
            raise DarConfigError(f"vllm-dar: layer {layer_index}: {message}")


_logged: set[str] = set()


def log_summary(model_dir: str, model: DarModel, dtype_bytes: int, context: int, *, ops: str,
                block_size: int, tp_size: int = 1, far_bytes: int | None = None) -> None:
    """One line per process: layers, windows, ranks, and KV bytes per token against full attention at
    ``dtype_bytes`` per element (the window cache's, and full attention's), the far cache at ``far_bytes``
    (default the same); under tensor parallelism also what one rank holds."""
    if model_dir in _logged:
        return
    _logged.add(model_dir)
    cfg, s = model.cfg, model.cfg.shape
    far_bytes = dtype_bytes if far_bytes is None else far_bytes
    full = s.kv_bytes_per_token(dtype_bytes)
    dar = cfg.kv_bytes_per_token(context, dtype_bytes, far_bytes)
    reduced_only = cfg.far_elems_per_token() * far_bytes
    logger.info("vllm-dar: DAR backend for %s (%s); KV bytes/token at %d context: %.0f vs %d full (%.3fx); "
                "far cache alone %d bytes/token (%d per element, window %d); window blocks of %d tokens "
                "(VLLM_DAR_BLOCK_SIZE); ops: %s (VLLM_DAR_OPS)", model_dir, cfg.describe(), context, dar, full,
                dar / full, reduced_only, far_bytes, dtype_bytes, block_size, ops)
    if tp_size > 1:
        rank = cfg.rank_kv_bytes_per_token(context, dtype_bytes, tp_size, far_bytes)
        how = ("split by KV head" if cfg.far_shards(tp_size) > 1 else
               "whole on every rank (one projection group spans the ranks; reduced K/V all-reduced)")
        logger.info("vllm-dar: tensor parallel size %d: one rank holds %.0f KV bytes/token at %d context vs %.0f "
                    "full (%.3fx); far caches %s", tp_size, rank, context, full / tp_size, rank * tp_size / full, how)
