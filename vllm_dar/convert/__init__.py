"""Conversion: checkpoint -> calibrate -> fit projections -> schedule -> DAR-converted checkpoint.

``convert`` is the keyword-only function behind ``vllm-dar convert`` (the CLI is a thin layer over it); its
defaults are ``Recipe()``'s (``recipe.py``). ``calibrate_model`` and ``plan`` are its two steps, for callers that
try several settings on one calibration.
"""
from __future__ import annotations

import os
import time

import torch

from ..checkpoint import write_converted
from ..config import PRICED_BLOCK_SIZE, BudgetConfig, DarConfig, DarConfigError, ModelShape
from ..data import split_files, token_windows
from ..hf import load_model
from ..kv_dtype import KV_CACHE_DTYPES, cache_itemsizes
from .calibrate import LayerStats, calibrate
from .fit import METHODS, LayerFit, fit_layer, refine_layer
from .recipe import DEFAULT, Recipe
from .schedule import SCHEDULES, WINDOWS, Setting, calibrated, measure_all, pyramid, rank_grid

__all__ = ["DEFAULT", "METHODS", "SCHEDULES", "Recipe", "calibrate_model", "convert", "plan"]


def calibrate_model(src: str, *, calib_files: list[str] | None, calib_tokens: int, context: int,
                    sink_tokens: int, progress: bool = True, device: str = "cpu"):
    """Load ``src`` in fp32 on ``device`` and collect calibration statistics (on the CPU). Returns (model, stats,
    record)."""
    model, tokenizer = load_model(src, dtype="float32")
    model.to(device)
    files = calib_files or split_files()[0]
    windows = token_windows(tokenizer, files, context=context, max_tokens=calib_tokens)
    stats = calibrate(model, windows, sink_tokens=sink_tokens, progress=progress)
    record = {"calib_windows": len(windows), "calib_context": context,
              "calib_files": len(files) if calib_files is None else [os.path.basename(f) for f in files]}
    return model, stats, record


def priced_itemsizes(kv_cache_dtype: str, dtype: str) -> tuple[int, int]:
    """Bytes per element of (the window cache, the far cache) of a model served with ``vllm serve
    --kv-cache-dtype KV_CACHE_DTYPE --dtype DTYPE`` (``kv_dtype.cache_itemsizes``; the window in the model dtype,
    as served by default): the calibrated schedule's prices. Only their ratio matters: ``auto`` is (1, 1)."""
    sizes = {"bfloat16": 2, "float16": 2, "float32": 4}
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise DarConfigError(f"kv_cache_dtype: {kv_cache_dtype!r} is not one of {tuple(KV_CACHE_DTYPES)}")
    if dtype not in sizes:
        raise DarConfigError(f"dtype: {dtype!r} is not one of {tuple(sizes)}")
    if kv_cache_dtype == "auto":
        return 1, 1
    return cache_itemsizes(kv_cache_dtype, sizes[dtype], fp8_window=False)


def plan(
    shape: ModelShape,
    stats: list[LayerStats],
    *,
    window: int,
    key_rank: int,
    value_rank: int,
    sink_tokens: int = 0,
    schedule: str = "uniform",
    method: str = "pca",
    head_sharing: str = "per_head",
    kv_budget: float | None = None,
    context: int = 2048,
    qk_reg: float = 0.1,
    fit_steps: int = 200,
    kv_cache_dtype: str = "auto",
    dtype: str = "bfloat16",
    progress: bool = True,
) -> tuple[DarConfig, list]:
    """Fit and schedule projections from calibration ``stats``. Returns (config, per-layer projections).

    The keyword defaults are the plain recipe (per-head PCA projections, the same setting in every layer, no
    sinks), which experiments vary one setting at a time; ``convert()``'s are the recommended ``Recipe()``.
    ``window``, ``key_rank`` and ``value_rank`` are the uniform setting: every layer's (``uniform``), the ramp's
    mean (``pyramid``); for ``calibrated`` with ``kv_budget`` None, ``Recipe.calibrated_budget`` reads them.
    ``kv_cache_dtype`` and ``dtype``: the served layout whose bytes the calibrated schedule prices
    (``priced_itemsizes``; ``benchmarks/fp8_recipe.py`` compares conversions priced for an FP8 far cache with
    plainly priced ones; plain pricing did better at the same served bytes, so ``convert`` has no such option).
    """
    if schedule not in SCHEDULES:
        raise DarConfigError(f"--schedule: {schedule!r} is not one of {SCHEDULES}")
    if kv_budget is not None and schedule != "calibrated":
        raise DarConfigError(f"--kv-budget: applies to --schedule calibrated only, not {schedule!r}")
    itemsizes = priced_itemsizes(kv_cache_dtype, dtype)
    # The projection groups (validates head_sharing and sinks), then the uniform setting where it is read.
    layout = DarConfig.uniform(shape, window=0, key_rank=1, value_rank=1, sink_tokens=sink_tokens,
                               head_sharing=head_sharing, method=method)
    groups = layout.groups
    fits: list[LayerFit] = [
        fit_layer(st.query_cov(), st.key_cov(groups), st.value_cov(groups), st.wo_metric,
                  head_dim=shape.head_dim, method=method, reg=qk_reg)
        for st in stats
    ]
    if schedule == "uniform":
        settings = [Setting(window, key_rank, value_rank)] * shape.num_layers
    elif schedule == "pyramid":
        settings = pyramid(shape.num_layers, window=window, key_rank=key_rank, value_rank=value_rank,
                           max_rank=layout.group_dim)
    else:
        budget = kv_budget if kv_budget is not None else Recipe(
            window=window, key_rank=key_rank, value_rank=value_rank, sink_tokens=sink_tokens,
            head_sharing=head_sharing, method=method, context=context).calibrated_budget(shape, itemsizes)
        ranks = rank_grid(layout.group_dim)
        errors = measure_all(stats, fits, windows=WINDOWS, ranks=ranks, sink_tokens=sink_tokens,
                             progress=progress)
        settings = calibrated(errors, windows=WINDOWS, ranks=ranks, groups=groups,
                              full_per_token=shape.slot_elems, context=context, sink_tokens=sink_tokens,
                              budget=budget, block_size=PRICED_BLOCK_SIZE, itemsizes=itemsizes)
    extra = {"schedule": schedule}
    if kv_cache_dtype != "auto" and schedule == "calibrated":  # informational (serving reads nothing here)
        extra["priced_for"] = {"kv_cache_dtype": kv_cache_dtype, "dtype": dtype}
    cfg = DarConfig(shape=shape, window=tuple(s.window for s in settings),
                    key_rank=tuple(s.key_rank for s in settings), value_rank=tuple(s.value_rank for s in settings),
                    sink_tokens=sink_tokens, head_sharing=head_sharing, method=method, extra=extra)
    projections = [f.at(s.key_rank, s.value_rank) for f, s in zip(fits, settings)]
    if method == "fit":
        projections = _refine(projections, stats, settings, sink_tokens=sink_tokens, steps=fit_steps,
                              progress=progress)
    return cfg, projections


def _refine(projections, stats, settings, *, sink_tokens: int, steps: int, progress: bool):
    from tqdm import tqdm

    out = []
    bar = tqdm(list(zip(projections, stats, settings)), desc="fitting layers", unit="layer", disable=not progress)
    for proj, st, s in bar:
        with torch.enable_grad():
            new, first, last = refine_layer(proj, st.sample, st.wo, window=s.window, sink_tokens=sink_tokens,
                                            steps=steps)
        bar.set_postfix(rel_err=f"{first:.3f}->{last:.3f}")
        out.append(new)
    return out


def convert(
    src: str,
    out: str,
    *,
    window: int = DEFAULT.window,
    key_rank: int = DEFAULT.key_rank,
    value_rank: int = DEFAULT.value_rank,
    sink_tokens: int = DEFAULT.sink_tokens,
    schedule: str = DEFAULT.schedule,
    method: str = DEFAULT.method,
    head_sharing: str = DEFAULT.head_sharing,
    kv_budget: float | None = DEFAULT.kv_budget,
    calib_files: list[str] | None = None,
    calib_tokens: int = DEFAULT.calib_tokens,
    context: int = DEFAULT.context,
    qk_reg: float = DEFAULT.qk_reg,
    fit_steps: int = DEFAULT.fit_steps,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    budget: BudgetConfig | None = None,
) -> DarConfig:
    """Convert the Hugging Face checkpoint ``src`` into a DAR-converted checkpoint at ``out``.

    The settings are ``Recipe``'s fields (see there); ``calib_files``: calibration text (default: the
    calibration part of python3.11-doc's sources); ``device``: where the calibration forward passes run
    (fp32; fitting and scheduling run on the CPU). Every setting is validated before the minutes-long
    calibration, and nothing is written on an error. The returned config's ``extra`` records the calibration.
    ``budget``: per-layer token budgets written into the ``dar`` section (``vllm-dar budget`` changes them later).
    """
    recipe = Recipe(window=window, key_rank=key_rank, value_rank=value_rank, sink_tokens=sink_tokens,
                    schedule=schedule, method=method, head_sharing=head_sharing, kv_budget=kv_budget,
                    context=context, calib_tokens=calib_tokens, qk_reg=qk_reg, fit_steps=fit_steps)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    from ..checkpoint import read_config

    shape = ModelShape.from_hf_config(read_config(src))
    recipe.check(shape)
    if budget is not None and len(budget.per_layer) != shape.num_layers:
        raise DarConfigError(f"dar.budget.per_layer: {len(budget.per_layer)} values for a model with "
                             f"{shape.num_layers} layers")
    t0 = time.time()
    model, stats, record = calibrate_model(src, calib_files=calib_files, calib_tokens=calib_tokens,
                                           context=context, sink_tokens=sink_tokens, progress=progress,
                                           device=device)
    del model
    with torch.no_grad():
        cfg, projections = plan(shape, stats, window=window, key_rank=key_rank, value_rank=value_rank,
                                sink_tokens=sink_tokens, schedule=schedule, method=method,
                                head_sharing=head_sharing, kv_budget=kv_budget, context=context,
                                qk_reg=qk_reg, fit_steps=fit_steps, progress=progress)
    record.update(cfg.extra, seconds=round(time.time() - t0, 1), kv_fraction_at_context=round(
        cfg.kv_fraction(context), 4), reserved_fraction_at_context=round(cfg.reserved_fraction(context), 4))
    cfg = DarConfig(**{**cfg.__dict__, "extra": record, "budget": budget})
    write_converted(src, out, cfg, projections, force=force)
    return cfg
