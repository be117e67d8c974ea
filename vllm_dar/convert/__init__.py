"""Conversion: checkpoint -> calibrate -> fit projections -> schedule -> DAR-converted checkpoint.

``convert`` is the keyword-only function behind ``vllm-dar convert``; the CLI is a thin layer over it.
"""
from __future__ import annotations

import os
import time

import torch

from ..checkpoint import write_converted
from ..config import DarConfig, DarConfigError, ModelShape
from ..data import split_files, token_windows
from ..hf import load_model
from .calibrate import LayerStats, calibrate
from .fit import METHODS, LayerFit, fit_layer, refine_layer
from .schedule import RANK_FRACTIONS, SCHEDULES, WINDOWS, Setting, calibrated, measure_all, pyramid

__all__ = ["METHODS", "SCHEDULES", "calibrate_model", "convert", "plan"]


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
    progress: bool = True,
) -> tuple[DarConfig, list]:
    """Fit and schedule projections from calibration ``stats``. Returns (config, per-layer projections)."""
    if schedule not in SCHEDULES:
        raise DarConfigError(f"--schedule: {schedule!r} is not one of {SCHEDULES}")
    # Validate the requested setting before any work (errors name the field).
    base = DarConfig.uniform(shape, window=window, key_rank=key_rank, value_rank=value_rank,
                             sink_tokens=sink_tokens, head_sharing=head_sharing, method=method)
    groups = base.groups
    fits: list[LayerFit] = [
        fit_layer(st.query_cov(), st.key_cov(groups), st.value_cov(groups), st.wo_metric,
                  head_dim=shape.head_dim, method=method, reg=qk_reg)
        for st in stats
    ]
    if schedule == "uniform":
        settings = [Setting(window, key_rank, value_rank)] * shape.num_layers
    elif schedule == "pyramid":
        settings = pyramid(shape.num_layers, window=window, key_rank=key_rank, value_rank=value_rank,
                           max_rank=base.group_dim)
    else:
        budget = kv_budget if kv_budget is not None else base.kv_fraction(context)
        ranks = sorted({max(1, round(base.group_dim * f)) for f in RANK_FRACTIONS})
        errors = measure_all(stats, fits, windows=WINDOWS, ranks=ranks, sink_tokens=sink_tokens,
                             progress=progress)
        settings = calibrated(errors, windows=WINDOWS, ranks=ranks, groups=groups,
                              full_per_token=shape.slot_elems, context=context, sink_tokens=sink_tokens,
                              budget=budget)
    cfg = DarConfig(shape=shape, window=tuple(s.window for s in settings),
                    key_rank=tuple(s.key_rank for s in settings), value_rank=tuple(s.value_rank for s in settings),
                    sink_tokens=sink_tokens, head_sharing=head_sharing, method=method,
                    extra={"schedule": schedule})
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
    window: int = 64,
    key_rank: int = 16,
    value_rank: int = 16,
    sink_tokens: int = 4,
    schedule: str = "uniform",
    method: str = "pca",
    head_sharing: str = "per_head",
    kv_budget: float | None = None,
    calib_files: list[str] | None = None,
    calib_tokens: int = 16384,
    context: int = 2048,
    qk_reg: float = 0.1,
    fit_steps: int = 200,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> DarConfig:
    """Convert the Hugging Face checkpoint ``src`` into a DAR-converted checkpoint at ``out``. ``device``: where
    the calibration forward passes run (fp32); fitting and scheduling run on the CPU."""
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if method not in METHODS:
        raise DarConfigError(f"--method: {method!r} is not one of {METHODS}")
    from ..checkpoint import read_config

    shape = ModelShape.from_hf_config(read_config(src))
    # Fail on a bad setting before the (minutes-long) calibration.
    DarConfig.uniform(shape, window=window, key_rank=key_rank, value_rank=value_rank, sink_tokens=sink_tokens,
                      head_sharing=head_sharing, method=method)
    if kv_budget is not None and not 0 < kv_budget <= 1:
        raise DarConfigError(f"--kv-budget: {kv_budget} must be in (0, 1]")
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
        cfg.kv_fraction(context), 4))
    cfg = DarConfig(**{**cfg.__dict__, "extra": record})
    write_converted(src, out, cfg, projections, force=force)
    return cfg
