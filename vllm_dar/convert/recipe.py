"""The conversion recipe: every setting of ``vllm-dar convert`` and ``convert()``, with their defaults in one place.

The defaults are the best recipe that needs no training: one projection across a layer's KV heads (``joint``,
LRKV-style), 4 sink tokens at full width, and per-layer windows and ranks chosen by the ``calibrated`` schedule
within a KV byte budget (``Recipe.calibrated_budget``): ``kv_budget`` (a fraction of the stock cache's bytes at
``context``); when it is not given, the bytes of a uniform ``window`` / ``key_rank`` / ``value_rank`` setting
the user gave, else ``DEFAULT_KV_BUDGET``. Bytes are counted as vLLM's caches reserve them
(``DarConfig.reserved_fraction``: block-rounded windows, padded far pages). Both ``convert()``'s keyword
defaults and the CLI's option defaults read ``Recipe()``, so they cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import PRICED_BLOCK_SIZE, DarConfig, DarConfigError, ModelShape
from .fit import METHODS
from .schedule import SCHEDULES, cheapest

# The default calibrated budget: what the recipe converted before far pages were priced (windows 32-512, ranks
# 16-96 of 192, chosen at the bytes of w=64 r=48/64 counting far caches as held) really reserved, now spent with
# its pages priced, so vLLM's capacity stays and the padding goes to quality (benchmarks/quality.py's
# calibrated-joint row and capacity.py, in the README).
DEFAULT_KV_BUDGET = 0.394
UNIFORM_FIELDS = ("window", "key_rank", "value_rank")


@dataclass(frozen=True)
class Recipe:
    """One conversion's settings; validates what it can without the model (the model's shape checks the rest:
    ranks against the projection width, in ``DarConfig``)."""

    window: int = 64  # full-width recent positions, the current one included
    key_rank: int = 48  # reduced key width per projection group (keys need fewer dimensions than values)
    value_rank: int = 64  # reduced value width per projection group
    sink_tokens: int = 4  # first positions kept at full width
    schedule: str = "calibrated"  # one of SCHEDULES
    method: str = "pca"  # one of METHODS
    head_sharing: str = "joint"  # per_head | joint (one projection across a layer's KV heads)
    kv_budget: float | None = None  # calibrated: KV bytes / stock KV bytes at context; None: the uniform setting's
    context: int = 2048  # calibration window, and the context the byte budget is counted at
    calib_tokens: int = 16384  # calibration text, tokens
    qk_reg: float = 0.1  # qk method: covariance ridge (larger -> PCA)
    fit_steps: int = 200  # fit method: optimiser steps per layer

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise DarConfigError(f"--schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.method not in METHODS:
            raise DarConfigError(f"--method: {self.method!r} is not one of {METHODS}")
        for name in ("context", "calib_tokens", "fit_steps"):
            if getattr(self, name) < 1:
                raise DarConfigError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 1")
        if self.kv_budget is None:
            return
        if not 0 < self.kv_budget <= 1:
            raise DarConfigError(f"--kv-budget: {self.kv_budget} must be in (0, 1] (a fraction of the stock KV "
                                 "bytes at --context)")
        if self.schedule != "calibrated":
            raise DarConfigError(f"--kv-budget: applies to --schedule calibrated only, not {self.schedule!r} "
                                 "(set --window/--key-rank/--value-rank instead)")
        given = self.given_uniform()
        if given:  # with a budget the calibrated schedule never reads them: refuse rather than ignore
            raise DarConfigError(f"--kv-budget: sets the calibrated schedule's bytes, which would ignore {given}; "
                                 "give either --kv-budget or the uniform setting whose bytes to spend")

    def given_uniform(self) -> dict[str, int]:
        """The uniform setting's fields that differ from the defaults (what the user gave)."""
        defaults = {f.name: f.default for f in fields(Recipe)}
        return {f: getattr(self, f) for f in UNIFORM_FIELDS if getattr(self, f) != defaults[f]}

    def calibrated_budget(self, shape: ModelShape, itemsizes: tuple[int, int] = (1, 1)) -> float:
        """The fraction of the stock KV bytes at ``context`` the calibrated schedule spends, counted as
        ``DarConfig.reserved_fraction`` (at the caches' element sizes ``itemsizes``, ``plan``'s prices):
        ``kv_budget``; else the bytes of the uniform setting, if one was given; else ``DEFAULT_KV_BUDGET``."""
        if self.kv_budget is not None:
            return self.kv_budget
        if not self.given_uniform():
            return DEFAULT_KV_BUDGET
        return DarConfig.uniform(shape, window=self.window, key_rank=self.key_rank, value_rank=self.value_rank,
                                 sink_tokens=self.sink_tokens, head_sharing=self.head_sharing,
                                 method=self.method).reserved_fraction(self.context, PRICED_BLOCK_SIZE,
                                                                       *itemsizes)

    def check(self, shape: ModelShape) -> None:
        """Validate against the model before any work (errors name the field): the uniform setting where it is
        read, and a calibrated budget the search can reach."""
        calibrated = self.schedule == "calibrated"
        if not calibrated or (self.kv_budget is None and self.given_uniform()):
            DarConfig.uniform(shape, window=self.window, key_rank=self.key_rank, value_rank=self.value_rank,
                              sink_tokens=self.sink_tokens, head_sharing=self.head_sharing, method=self.method)
        if not calibrated:
            return
        budget = self.calibrated_budget(shape)
        low = cheapest(shape, sink_tokens=self.sink_tokens, head_sharing=self.head_sharing)
        least = low.reserved_fraction(self.context, PRICED_BLOCK_SIZE)
        if budget < least:
            raise DarConfigError(
                f"--kv-budget: {budget:.4g} is below {least:.4f}, the least the "
                f"calibrated schedule can spend on this model at --context {self.context} (window {low.window[0]}, "
                f"ranks {low.key_rank[0]}/{low.value_rank[0]} in every layer)")


DEFAULT = Recipe()
FIELDS = tuple(f.name for f in fields(Recipe))
