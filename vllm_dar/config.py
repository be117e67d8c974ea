"""The ``dar`` section of a DAR-converted checkpoint's ``config.json``, as frozen, self-validating dataclasses.

On disk (``config.json``)::

    "dar": {
      "format_version": 1,
      "method": "pca",                 # how the projections were fitted (informational)
      "head_sharing": "per_head",      # "per_head": one projection per KV head; "joint": one across the layer's
                                       #   KV heads (LRKV-style), whose reduced width is shared by all heads
      "sink_tokens": 4,                # first N positions kept at full width in every layer
      "projection_file": "dar/projections.safetensors",
      "window": [64, 64, ...],         # per layer: full-width recent positions, current token included (0: none)
      "key_rank": [16, ...],           # per layer: reduced key width per projection group
      "value_rank": [16, ...],         # per layer: reduced value width per projection group
      "budget": {...}                  # optional: per-layer token budgets of distant tokens (BudgetConfig)
    }

Every error names the field and the bad value, so a malformed section fails loudly at load time.

KV byte model: the one place these counts are written (convert, the ops, the plugin's start-up line and the
benchmarks use it). Per layer, for one sequence of ``L`` tokens (the newest included), with ``J`` KV heads of
width ``D`` (a *slot*: ``2 J D`` elements, K and V of one token at full width), ``H`` query heads, ``G``
projection groups, ranks ``rk``/``rv``, window ``w`` (current token included) and ``S`` sinks, the newest token
sees ``F = min(L, w + S)`` positions at full width (``LayerDar.full_positions``):

* full attention holds, and a decode step reads, ``2 J D L`` elements (``ModelShape.kv_elems``);
* DAR *holds* the reduced K/V of every token in the far cache, ``G (rk + rv) L``, plus the sinks and the window
  at full width in the window cache, ``2 J D F`` (``DarConfig.kv_elems``, ``kv_fraction``,
  ``kv_bytes_per_token``);
* a DAR decode step *reads* the reduced K/V of the ``L - F`` far positions only, ``G (rk + rv) (L - F)``, and
  ``2 J D F`` at full width (sinks, the ``w - 1`` cached window positions and the fresh token); plus, once per
  step and layer for the whole batch, the fp32 projections: ``(H + J) D (rk + rv)`` elements (``Q_h``, ``U_h``
  per query head; ``K_g``, ``V_g`` of the cache write) (``DarConfig.decode_bytes``).

Not counted in what is held: block rounding, the window manager's tails and the padded far pages (the
allocator's, below; vLLM's logged capacity includes them), and per step the write of the new token (``2 J D``,
DAR also ``G (rk + rv)``) and the kernels' fp32 scratch, both negligible at long ``L``.

What the caches *reserve* per request is paged. The window cache, with ``B``-token blocks: the sinks'
``ceil(S / B)`` blocks and, per tail, ``ceil((w - 1) / B) + 1`` blocks (the ``w - 1`` positions the next step
reads at full width) (``window_cache_blocks``); vLLM's admission and logged capacity count two tails (the one in
flight and the next), a request in steady decode holds one. The far cache: vLLM gives every cache one page size,
so a far page holds a window page's bytes, ``2 J D B`` elements, as ``far_block_sizes`` tokens of ``G (rk + rv)``
(rounded down to ``B`` times a divisor of 48 at ``B = 16``): ranks whose ``G (rk + rv)`` does not fill it pad
every page (at ``2 J D = 384``: 80 elements take 96, 144 take 192), and the last page of a request is whole
(``reserved_far_elems``). ``DarConfig.reserved_fraction`` prices both that way: the calibrated schedule spends
its budget in those terms, so that large windows and page-padding ranks cost what vLLM makes them cost.

Under tensor parallelism (``tp`` ranks, each owning ``J / tp`` KV heads) a rank's window cache holds its heads'
``2 J D F / tp``; its far caches hold ``G (rk + rv) L / tp`` when each rank owns whole projection groups
(``per_head``), and all ``G (rk + rv) L`` when one group spans the ranks (``joint``: every rank stores the group's
reduced K/V, all-reduced from the ranks' partial projections) (``DarConfig.far_shards``,
``rank_kv_bytes_per_token``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

FORMAT_VERSION = 1
PROJECTION_FILE = "dar/projections.safetensors"  # in a subfolder: vLLM's loader globs only the top level
HEAD_SHARING = ("per_head", "joint")
PROJECTION_ITEMSIZE = 4  # the plugin keeps projections in fp32 (vllm_dar.ops.paged.PagedProjections)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class DarConfigError(ValueError):
    """A malformed ``dar`` section or one that does not fit the model."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def window_cache_blocks(window: int, sink_tokens: int, block_size: int, tails: int) -> int:
    """Blocks the window cache reserves for one request (``vllm_dar.plugin.spec.DarWindowManager``): the sinks'
    blocks, and ``tails`` spans of the ``w - 1`` newest positions, each touching up to ``ceil((w - 1) / B) + 1``
    blocks of ``B = block_size`` tokens (window 0 keeps one position: the plugin's sliding window is >= 1)."""
    cdiv = lambda a, b: -(-a // b)
    return cdiv(sink_tokens, block_size) + tails * (cdiv(max(window, 1) - 1, block_size) + 1)


RESERVED_TAILS = 2  # tails vLLM's admission and logged capacity count per request (module docstring)
PRICED_BLOCK_SIZE = 16  # the plugin's default window block (VLLM_DAR_BLOCK_SIZE), at which convert prices windows
MAX_HIT_ALIGNMENT = 1024  # tokens: the far blocks' least common multiple, vLLM's prefix-cache hit unit, at most


def far_block_sizes(window_block: int, slot_elems: int, far_slot_elems: list[int]) -> list[int]:
    """Tokens per far-cache block of each layer, so that every page holds one window page's bytes.

    ``slot_elems``: K + V elements of a full-width token slot; ``far_slot_elems``: of a reduced one, per layer
    (both in bytes instead where the caches' dtypes differ: a far cache in FP8 beside a window in the model dtype,
    ``vllm_dar.kv_dtype.cache_dtypes``).
    Where a reduced slot is wider than a full-width one (a joint group under tensor parallelism: the whole
    group's reduced K/V beside one rank's heads), the page is ``window_block`` of the widest reduced slots
    instead, and vLLM brings the window pages to it (a larger window block where the page is a multiple of
    theirs, else padded pages). Exact fit is ``window_block * slot_elems / far`` tokens (64 at
    ranks 16/16 of 64), rounded down to
    ``window_block * m`` with ``m`` a divisor of ``_block_lcm(window_block)``: the prefix-cache hash unit stays
    the window block, and the blocks of any mix of layers have a least common multiple (vLLM's prefix-cache hit
    alignment) of at most ``MAX_HIT_ALIGNMENT`` tokens. Without tensor parallelism (no reduced slot is wider than a
    full one) each layer's block depends on its own ranks only, so the calibrated schedule can price a layer's
    pages alone.
    """
    n = _block_lcm(window_block)
    multiples = [m for m in range(1, n + 1) if n % m == 0]
    slot_elems = max([slot_elems, *far_slot_elems])
    out = []
    for f in far_slot_elems:
        exact = window_block * slot_elems // f // window_block
        out.append(window_block * max([m for m in multiples if m <= exact], default=1))
    return out


def reserved_far_elems(context: int, window_block: int, slot_elems: int, far_slot_elems: int,
                       window_itemsize: int = 1, far_itemsize: int = 1) -> int:
    """What one layer's far cache reserves for a ``context``-token request, in window-cache elements: whole pages
    of ``far_block_sizes`` tokens, each the bytes of a window page (``window_block`` slots of ``slot_elems``; one
    process: ``far_slot_elems * far_itemsize <= slot_elems * window_itemsize``). The caches' element sizes
    matter only where they differ (an FP8 far cache beside a window in the model dtype: ``vllm_dar.kv_dtype``)."""
    far_block = far_block_sizes(window_block, slot_elems * window_itemsize, [far_slot_elems * far_itemsize])[0]
    return -(-context // far_block) * window_block * slot_elems


def _block_lcm(window_block: int) -> int:
    """The largest ``3 * 2^a`` (else ``2^a``; else 1) whose multiple of ``window_block`` is within
    ``MAX_HIT_ALIGNMENT``: far blocks are ``window_block`` times one of its divisors (at 16-token window blocks:
    48, whose divisors fit every joint SmolLM2 rank sum exactly)."""
    m = 3 if window_block * 3 <= MAX_HIT_ALIGNMENT else 1
    while window_block * m * 2 <= MAX_HIT_ALIGNMENT:
        m *= 2
    return m


def read_json(path: str) -> dict:
    """A JSON object file (a checkpoint's ``config.json``); anything else is refused naming the file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DarConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise DarConfigError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The attention shapes of the model a ``dar`` section belongs to."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        for name, hf in (("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
                         ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim")):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise DarConfigError(f"config.json {hf}: {v!r} must be an integer >= 1")

    @classmethod
    def from_hf_config(cls, cfg, *, require_supported: bool = True) -> ModelShape:
        """Shapes of a Hugging Face config (dict or object); refuses architectures DAR cannot convert unless
        ``require_supported`` is False (byte counts of any stock model)."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        archs = get("architectures") or ["?"]
        arch = archs[0] if isinstance(archs, list) else archs
        if require_supported and arch not in SUPPORTED_ARCHITECTURES:
            raise DarConfigError(
                f"architectures: {arch!r} is not supported; DAR conversion supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads, hidden = get("num_attention_heads"), get("hidden_size")
        head_dim = get("head_dim")  # None or absent: hidden_size // num_attention_heads
        if head_dim is None and _is_int(heads) and _is_int(hidden) and heads > 0:
            head_dim = hidden // heads
        kv_heads = get("num_key_value_heads")  # None or absent: one KV head per query head (HF's convention)
        return cls(get("num_hidden_layers"), heads, heads if kv_heads is None else kv_heads, head_dim)

    @property
    def slot_elems(self) -> int:
        """K + V elements of one token in one layer at full width: ``2 J D``."""
        return 2 * self.num_kv_heads * self.head_dim

    def kv_elems(self, context: int) -> int:
        """K/V elements full attention holds (and a decode step reads) for one ``context``-token sequence, all
        layers."""
        return context * self.num_layers * self.slot_elems

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes full attention holds per token, all layers, at ``itemsize`` bytes per element."""
        return self.kv_elems(1) * itemsize


@dataclass(frozen=True, slots=True)
class LayerDar:
    """One layer's DAR setting. ``groups`` projection groups share the layer's KV heads evenly."""

    window: int
    key_rank: int
    value_rank: int
    sink_tokens: int
    groups: int
    group_dim: int  # input width of one group's projection: head_dim * num_kv_heads // groups

    def reduced_elems(self) -> int:
        """Reduced K+V elements stored per token (all KV heads of the layer)."""
        return self.groups * (self.key_rank + self.value_rank)

    @property
    def slot_elems(self) -> int:
        """K + V elements of one token at full width (all KV heads of the layer)."""
        return 2 * self.groups * self.group_dim

    def full_positions(self, context: int) -> int:
        """Positions of a ``context``-token sequence held at full width, and read so by its newest token: the
        sinks and the window (every position while ``context <= window + sink_tokens``)."""
        return min(context, self.window + self.sink_tokens)

    def reserved_full_slots(self, context: int, block_size: int = PRICED_BLOCK_SIZE) -> int:
        """Full-width slots the window cache reserves for one ``context``-token request (module docstring)."""
        blocks = window_cache_blocks(self.window, self.sink_tokens, block_size, RESERVED_TAILS)
        return min(context, blocks * block_size)

    def read_elems(self, context: int) -> int:
        """K/V elements one decode step reads for a sequence at ``context`` tokens, the fresh one included."""
        full = self.full_positions(context)
        return (context - full) * self.reduced_elems() + full * self.slot_elems


BUDGET_KINDS = ("fraction", "tokens")
PYRAMID_BETA = 20.0  # PyramidKV's default: the top layer keeps mean / beta
BUDGET_SCHEDULES = ("pyramid", "uniform", "explicit")
POOLINGS = ("max", "avg")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class BudgetConfig:
    """Per-layer token budgets (PyramidKV, arXiv 2406.02069): how many of a request's distant prompt tokens each
    layer keeps in its far cache, chosen SnapKV-style. On disk, the ``dar`` section's ``budget`` object::

        "budget": {
          "kind": "fraction",          # per_layer holds fractions of a layer's candidates kept ("tokens": counts)
          "per_layer": [0.19, ...],    # one per layer: the budget the engine applies
          "observation_window": 32,    # the last W prompt queries score the candidates
          "pooling": "max",            # "max" | "avg": 1-D pooling of the scores along positions
          "pool_kernel": 7,            # odd pooling width
          "schedule": "pyramid",       # how per_layer was made (pyramid | uniform | explicit; informational)
          "mean": 0.1,                 # the mean budget asked for (informational)
          "beta": 20                   # pyramid's min = mean / beta (informational)
        }

    Semantics, for a request whose prompt has ``P`` tokens, in layer ``l`` (window ``w``, ``S`` sinks):

    * *protected*: the sinks (full width), and the last ``T = max(w - 1, W)`` prompt positions (the next token's
      window, and the observation window itself); every generated token is kept too;
    * *candidates*: positions ``[S, c)``, ``c = P - T`` (``candidates``); the layer keeps ``kept(l, n)`` of its
      ``n`` candidates per projection group, those of the highest pooled score
      (``vllm_dar.reference.select_kept``), and the far cache forgets the rest once the prompt is processed.
    * *served* (``kept_span``): the kept entries are moved to the far-cache slots of positions ``[s0, c)``, just
      below the positions kept in place, where ``s0`` is ``c - kept`` rounded down to the far cache's block
      (``Bf`` tokens); the blocks below ``s0`` go back to vLLM's pool. So a layer keeps the ``c - s0 >= kept``
      best candidates (the partial block's slots are allocated anyway), and nothing when no whole block would
      be freed (``s0 <= S``). ``far_block=1`` is the exact budget.

    Selection happens once per request, at the end of its prompt; positions that become distant later (the
    protected tail, generated tokens) are kept at reduced width as without budgets. ``fraction`` 0 keeps no
    candidate (window and sinks only, StreamingLLM-like); fraction 1 keeps every one (plain DAR).
    """

    kind: str
    per_layer: tuple
    observation_window: int = 32
    pooling: str = "max"
    pool_kernel: int = 7
    schedule: str = "explicit"
    mean: float | None = None
    beta: float | None = None

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise DarConfigError(f"dar.budget.kind: {self.kind!r} is not one of {BUDGET_KINDS}")
        if not isinstance(self.per_layer, tuple) or not self.per_layer:
            raise DarConfigError(f"dar.budget.per_layer: expected a list of numbers, got {self.per_layer!r}")
        for i, v in enumerate(self.per_layer):
            if self.kind == "fraction" and not (_is_number(v) and 0 <= v <= 1):
                raise DarConfigError(f"dar.budget.per_layer[{i}]: {v!r} must be a fraction in [0, 1] "
                                     "(kind fraction)")
            if self.kind == "tokens" and not (_is_int(v) and v >= 0):
                raise DarConfigError(f"dar.budget.per_layer[{i}]: {v!r} must be an integer >= 0 (kind tokens)")
        if not _is_int(self.observation_window) or self.observation_window < 1:
            raise DarConfigError(f"dar.budget.observation_window: {self.observation_window!r} must be an "
                                 "integer >= 1")
        if self.pooling not in POOLINGS:
            raise DarConfigError(f"dar.budget.pooling: {self.pooling!r} is not one of {POOLINGS}")
        if not _is_int(self.pool_kernel) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise DarConfigError(f"dar.budget.pool_kernel: {self.pool_kernel!r} must be an odd integer >= 1")
        if self.schedule not in BUDGET_SCHEDULES:
            raise DarConfigError(f"dar.budget.schedule: {self.schedule!r} is not one of {BUDGET_SCHEDULES}")
        for name in ("mean", "beta"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v >= 0):
                raise DarConfigError(f"dar.budget.{name}: {v!r} must be a number >= 0")

    def protected(self, window: int) -> int:
        """Prompt positions at the end of the prompt never evicted in a layer of ``window``: ``max(w - 1, W)``."""
        return max(window - 1, self.observation_window)

    def candidates(self, prompt_len: int, window: int, sink_tokens: int) -> int:
        """Candidates of a layer for a ``prompt_len``-token prompt: positions ``[S, P - T)`` (class docstring)."""
        return max(0, prompt_len - self.protected(window) - sink_tokens)

    def kept(self, layer: int, candidates: int) -> int:
        """Candidates layer ``layer`` keeps out of ``candidates``: ``floor(f n + 1/2)`` for a fraction ``f``,
        ``min(N, n)`` for a count ``N`` (the engine and the reference both call this)."""
        b = self.per_layer[layer]
        if self.kind == "fraction":
            return min(candidates, int(b * candidates + 0.5))
        return min(candidates, b)

    def kept_span(self, layer: int, prompt_len: int, window: int, sink_tokens: int, far_block: int = 1
                  ) -> tuple[int, int]:
        """``(s0, c)``: after a ``prompt_len``-token prompt, layer ``layer``'s far cache holds its kept candidates
        at the slots of positions ``[s0, c)`` and nothing below ``s0``; ``(0, c)`` when it evicts nothing (class
        docstring). The engine's scheduler (``vllm_dar.plugin.spec.DarFarManager``), its compaction and the
        reference all take the span from here."""
        n = self.candidates(prompt_len, window, sink_tokens)
        c = sink_tokens + n
        s0 = (c - self.kept(layer, n)) // far_block * far_block
        return (0, c) if s0 <= sink_tokens else (s0, c)

    @classmethod
    def make(cls, mean: float, num_layers: int, *, schedule: str = "pyramid", beta: float = PYRAMID_BETA,
             **kw) -> BudgetConfig:
        """Budgets of mean ``mean`` over ``num_layers`` layers: a fraction in [0, 1] when ``mean`` is a float, a
        token count when it is an int (see ``parse_budget``). ``pyramid`` (PyramidKV's schedule): linear from
        the lowest layer's ``2 mean - mean / beta`` down to the highest layer's ``mean / beta`` (when the top
        exceeds what a layer can keep, a fraction's 1: the top is 1 and the bottom ``2 mean - 1``); ``uniform``:
        ``mean`` in every layer."""
        kind = "tokens" if _is_int(mean) else "fraction"
        if not _is_number(mean) or mean < 0 or (kind == "fraction" and mean > 1):
            raise DarConfigError(f"--token-budget: {mean!r} must be a fraction in [0, 1] or a token count >= 1")
        if schedule == "uniform" or num_layers == 1:
            values = [float(mean)] * num_layers
        elif schedule == "pyramid":
            if not _is_number(beta) or beta < 1:
                raise DarConfigError(f"--budget-beta: {beta!r} must be a number >= 1")
            lo = mean / beta
            hi = 2 * mean - lo
            if kind == "fraction" and hi > 1:
                hi, lo = 1.0, 2 * mean - 1
            values = [hi - (hi - lo) * i / (num_layers - 1) for i in range(num_layers)]
        else:
            raise DarConfigError(f"--budget-schedule: {schedule!r} is not one of pyramid, uniform")
        per_layer = tuple(round(v) for v in values) if kind == "tokens" else tuple(round(v, 6) for v in values)
        return cls(kind=kind, per_layer=per_layer, schedule=schedule, mean=mean,
                   beta=beta if schedule == "pyramid" else None, **kw)

    def to_json(self) -> dict:
        d = {"kind": self.kind, "per_layer": list(self.per_layer), "observation_window": self.observation_window,
             "pooling": self.pooling, "pool_kernel": self.pool_kernel, "schedule": self.schedule}
        d.update({k: getattr(self, k) for k in ("mean", "beta") if getattr(self, k) is not None})
        return d

    @classmethod
    def from_json(cls, section, num_layers: int) -> BudgetConfig:
        if not isinstance(section, dict):
            raise DarConfigError(f"dar.budget: expected an object, got {type(section).__name__}")
        known = {"kind", "per_layer", "observation_window", "pooling", "pool_kernel", "schedule", "mean", "beta"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise DarConfigError(f"dar.budget: unknown field(s) {unknown}")
        for required in ("kind", "per_layer"):
            if required not in section:
                raise DarConfigError(f"dar.budget.{required}: missing")
        per_layer = section["per_layer"]
        if not isinstance(per_layer, list) or len(per_layer) != num_layers:
            raise DarConfigError(f"dar.budget.per_layer: expected a list of {num_layers} numbers (one per layer), "
                                 f"got {per_layer!r}")
        return cls(**{**section, "per_layer": tuple(per_layer)})

    def describe(self) -> str:
        v = self.per_layer
        span = f"{v[0]}" if len(set(v)) == 1 else f"{v[0]}..{v[-1]}"
        return f"token budget {self.kind} {span} ({self.schedule}), observation window {self.observation_window}"


def parse_budget(text: str) -> float | int:
    """``--token-budget``: a fraction in [0, 1] (``0.1``; ``0`` keeps no distant prompt token) or an integer
    token count >= 1 (``512``)."""
    try:
        value = float(text)
    except ValueError:
        raise DarConfigError(f"--token-budget: {text!r} is not a number") from None
    if value >= 1 and value == int(value) and "." not in text and "e" not in text.lower():
        return int(value)
    if not 0 <= value <= 1:
        raise DarConfigError(f"--token-budget: {text!r} must be a fraction in [0, 1] or an integer token count")
    return value


@dataclass(frozen=True, slots=True)
class DecodeBytes:
    """Bytes one decode step moves (``DarConfig.decode_bytes``): ``dar`` and ``full``, the K/V one sequence
    reads under DAR and under full attention; ``projections``, DAR's fp32 projections, read once per step for
    the whole batch (a batch of ``B`` reads ``B * dar + projections``)."""

    dar: int
    full: int
    projections: int


@dataclass(frozen=True)
class DarConfig:
    shape: ModelShape
    window: tuple[int, ...]
    key_rank: tuple[int, ...]
    value_rank: tuple[int, ...]
    sink_tokens: int = 0
    head_sharing: str = "per_head"
    method: str = "pca"
    projection_file: str = PROJECTION_FILE
    format_version: int = FORMAT_VERSION
    budget: BudgetConfig | None = None  # per-layer token budgets of distant tokens (None: every token kept)
    extra: dict = field(default_factory=dict)  # informational (calibration record); never read by the server

    def __post_init__(self):
        s = self.shape
        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            raise DarConfigError(f"dar.format_version: {self.format_version!r} is not supported (expected {FORMAT_VERSION})")
        if self.head_sharing not in HEAD_SHARING:
            raise DarConfigError(f"dar.head_sharing: {self.head_sharing!r} is not one of {HEAD_SHARING}")
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise DarConfigError(f"dar.sink_tokens: {self.sink_tokens!r} must be an integer >= 0")
        f = self.projection_file
        escapes = isinstance(f, str) and (".." in f.replace("\\", "/").split("/") or "\0" in f)
        if not isinstance(f, str) or not f or os.path.isabs(f) or escapes:
            raise DarConfigError(f"dar.projection_file: {f!r} must be a relative path inside the checkpoint")
        if not isinstance(self.method, str):
            raise DarConfigError(f"dar.method: {self.method!r} must be a string")
        if not isinstance(self.extra, dict):
            raise DarConfigError(f"dar.extra: {self.extra!r} must be an object")
        if self.budget is not None and len(self.budget.per_layer) != s.num_layers:
            raise DarConfigError(f"dar.budget.per_layer: {len(self.budget.per_layer)} values for a model with "
                                 f"{s.num_layers} layers")
        limit = self.group_dim
        for name, lo in (("window", 0), ("key_rank", 1), ("value_rank", 1)):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) != s.num_layers:
                raise DarConfigError(
                    f"dar.{name}: expected a list of {s.num_layers} integers (one per layer), got {values!r}"
                )
            for i, v in enumerate(values):
                if not _is_int(v) or v < lo:
                    raise DarConfigError(f"dar.{name}[{i}]: {v!r} must be an integer >= {lo}")
                if name != "window" and v > limit:
                    raise DarConfigError(
                        f"dar.{name}[{i}]: {v} exceeds the projection input width {limit} "
                        f"(head_dim {s.head_dim}, head_sharing {self.head_sharing})"
                    )

    @property
    def groups(self) -> int:
        return self.shape.num_kv_heads if self.head_sharing == "per_head" else 1

    @property
    def group_dim(self) -> int:
        return self.shape.head_dim * self.shape.num_kv_heads // self.groups

    def layer(self, i: int) -> LayerDar:
        return LayerDar(self.window[i], self.key_rank[i], self.value_rank[i], self.sink_tokens,
                        self.groups, self.group_dim)

    # ---- bytes (the byte model of the module docstring) ----
    def evicted_positions(self, context: int, far_blocks: list[int] | None = None) -> list[int]:
        """Per layer, the candidates the far cache forgets under token budgets for a request whose prompt is its
        first ``context`` tokens (``BudgetConfig.kept_span``), at far blocks of ``far_blocks`` tokens (default:
        the served layout's in the model dtype, ``far_block_tokens``; all 1: the exact budgets); all 0 without
        budgets."""
        n = self.shape.num_layers
        if self.budget is None:
            return [0] * n
        far_blocks = self.far_block_tokens() if far_blocks is None else far_blocks
        spans = [self.budget.kept_span(i, context, self.window[i], self.sink_tokens, far_blocks[i])
                 for i in range(n)]
        return [max(0, s0 - self.sink_tokens) for s0, _ in spans]

    def far_block_tokens(self, window_block: int = PRICED_BLOCK_SIZE, window_itemsize: int = 1,
                         far_itemsize: int = 1, tp_size: int = 1) -> list[int]:
        """Tokens per far-cache block of each layer as one of ``tp_size`` tensor-parallel ranks serves this model
        (``far_block_sizes`` over the slots one rank holds: its KV heads' at full width, its share of the reduced
        ones, ``far_shards``), at ``window_block``-token window blocks and the caches' element sizes (only their
        ratio matters)."""
        shards = self.far_shards(tp_size)
        slot = self.layer(0).slot_elems // tp_size * window_itemsize
        return far_block_sizes(window_block, slot, [self.layer(i).reduced_elems() // shards * far_itemsize
                                                    for i in range(self.shape.num_layers)])

    def held_split(self, context: int) -> tuple[int, int]:
        """(window-cache, far-cache) K/V elements the DAR caches hold for one sequence of ``context`` tokens, all
        layers (with token budgets: a request right after its ``context``-token prompt, less
        ``evicted_positions``, as served)."""
        layers = [self.layer(i) for i in range(self.shape.num_layers)]
        window = sum(lay.full_positions(context) * lay.slot_elems for lay in layers)
        far = sum((context - n) * lay.reduced_elems() for n, lay in zip(self.evicted_positions(context), layers))
        return window, far

    def kv_elems(self, context: int) -> int:
        """K/V elements the DAR caches hold for one sequence of ``context`` tokens, all layers (``held_split``)."""
        return sum(self.held_split(context))

    def kv_fraction(self, context: int) -> float:
        """``kv_elems`` over what full attention holds for the same sequence."""
        return self.kv_elems(context) / self.shape.kv_elems(context)

    def kv_bytes_per_token(self, context: int, itemsize: int, far_itemsize: int | None = None) -> float:
        """Bytes the DAR caches hold per token of a ``context``-token sequence, at ``itemsize`` bytes per
        element of the window cache and ``far_itemsize`` (default ``itemsize``) of the far cache (the dtypes the
        engine caches K/V in: ``vllm_dar.kv_dtype.cache_dtypes``)."""
        return self.rank_kv_bytes_per_token(context, itemsize, 1, far_itemsize)

    def far_shards(self, tp_size: int) -> int:
        """Ranks the far caches are split over under ``tp_size``-way tensor parallelism: ``tp_size`` when each
        rank owns whole projection groups; 1 when one group spans the ranks (``joint``: replicated)."""
        return tp_size if self.groups % tp_size == 0 else 1

    def rank_kv_bytes_per_token(self, context: int, itemsize: int, tp_size: int,
                                far_itemsize: int | None = None) -> float:
        """``kv_bytes_per_token`` as one of ``tp_size`` tensor-parallel ranks holds it (module docstring)."""
        window, far = self.held_split(context)
        far_itemsize = itemsize if far_itemsize is None else far_itemsize
        return (window * itemsize / tp_size + far * far_itemsize / self.far_shards(tp_size)) / context

    def reserved_fraction(self, context: int, block_size: int = PRICED_BLOCK_SIZE, window_itemsize: int = 1,
                          far_itemsize: int = 1) -> float:
        """What the caches reserve for one ``context``-token request at ``block_size``-token window blocks, over
        what full attention holds in the window cache's dtype: windows as the window cache reserves them
        (``LayerDar.reserved_full_slots``), far caches in whole padded pages (``reserved_far_elems``), at the
        caches' element sizes (only their ratio matters). What the calibrated schedule's budget counts."""
        elems = sum(reserved_far_elems(context, block_size, lay.slot_elems, lay.reduced_elems(), window_itemsize,
                                       far_itemsize)
                    + lay.reserved_full_slots(context, block_size) * lay.slot_elems
                    for lay in map(self.layer, range(self.shape.num_layers)))
        return elems / self.shape.kv_elems(context)

    def far_elems_per_token(self) -> int:
        """Reduced K/V elements the far caches hold per token, all layers."""
        return sum(self.layer(i).reduced_elems() for i in range(self.shape.num_layers))

    def decode_bytes(self, context: int, itemsize: int, far_itemsize: int | None = None) -> DecodeBytes:
        """Bytes one decode step moves for a sequence at ``context`` tokens (the fresh one included), caches
        of ``itemsize`` bytes per element (the far cache ``far_itemsize``, default the same), all layers
        (module docstring); ``full`` is full attention at ``itemsize``."""
        s = self.shape
        layers = [self.layer(i) for i in range(s.num_layers)]
        heads = s.num_heads + s.num_kv_heads  # Q_h, U_h per query head; K_g, V_g: G groups of J D / G inputs
        proj = sum(heads * s.head_dim * (lay.key_rank + lay.value_rank) for lay in layers)
        far_itemsize = itemsize if far_itemsize is None else far_itemsize
        evicted = [n * lay.reduced_elems() for n, lay in zip(self.evicted_positions(context), layers)]
        read = [(lay.read_elems(context) - ev, (context - lay.full_positions(context)) * lay.reduced_elems() - ev)
                for lay, ev in zip(layers, evicted)]  # (all, far) elements read
        return DecodeBytes(dar=sum((n - far) * itemsize + far * far_itemsize for n, far in read),
                           full=s.kv_elems(context) * itemsize, projections=proj * PROJECTION_ITEMSIZE)

    # ---- (de)serialisation ----
    def to_json(self) -> dict:
        d = {
            "format_version": self.format_version,
            "method": self.method,
            "head_sharing": self.head_sharing,
            "sink_tokens": self.sink_tokens,
            "projection_file": self.projection_file,
            "window": list(self.window),
            "key_rank": list(self.key_rank),
            "value_rank": list(self.value_rank),
        }
        if self.budget is not None:
            d["budget"] = self.budget.to_json()
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_json(cls, section, shape: ModelShape) -> DarConfig:
        if not isinstance(section, dict):
            raise DarConfigError(f"dar: expected an object, got {type(section).__name__}")
        known = {"format_version", "method", "head_sharing", "sink_tokens", "projection_file",
                 "window", "key_rank", "value_rank", "budget", "extra"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise DarConfigError(f"dar: unknown field(s) {unknown}")
        for required in ("format_version", "window", "key_rank", "value_rank"):
            if required not in section:
                raise DarConfigError(f"dar.{required}: missing")
        kw = dict(section)
        for name in ("window", "key_rank", "value_rank"):
            v = kw[name]
            kw[name] = tuple(v) if isinstance(v, list) else v
        if "budget" in kw:
            kw["budget"] = BudgetConfig.from_json(kw["budget"], shape.num_layers)
        return cls(shape=shape, **kw)

    @classmethod
    def from_model_dir(cls, model_dir: str) -> DarConfig | None:
        """The model's DAR config, or None for a model without a ``dar`` section."""
        cfg = read_json(os.path.join(model_dir, "config.json"))
        if "dar" not in cfg:
            return None
        return cls.from_json(cfg["dar"], ModelShape.from_hf_config(cfg))

    @classmethod
    def uniform(cls, shape: ModelShape, *, window: int, key_rank: int, value_rank: int, **kw) -> DarConfig:
        n = shape.num_layers
        return cls(shape=shape, window=(window,) * n, key_rank=(key_rank,) * n, value_rank=(value_rank,) * n, **kw)

    def describe(self) -> str:
        def span(v):
            return str(v[0]) if len(set(v)) == 1 else f"{min(v)}..{max(v)}"
        return (f"{self.shape.num_layers} layers, window {span(self.window)}, key rank {span(self.key_rank)}, "
                f"value rank {span(self.value_rank)}, {self.sink_tokens} sink tokens, {self.head_sharing}, "
                f"method {self.method}" + (f", {self.budget.describe()}" if self.budget is not None else ""))

