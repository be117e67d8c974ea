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
      "value_rank": [16, ...]          # per layer: reduced value width per projection group
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


def reserved_far_elems(context: int, window_block: int, slot_elems: int, far_slot_elems: int) -> int:
    """Elements one layer's far cache reserves for a ``context``-token request: whole pages of
    ``far_block_sizes`` tokens, each the bytes of a window page (``window_block`` slots of ``slot_elems``; one
    process: ``far_slot_elems <= slot_elems``)."""
    far_block = far_block_sizes(window_block, slot_elems, [far_slot_elems])[0]
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

    def held_elems(self, context: int) -> int:
        """K/V elements the layer's caches hold for one ``context``-token sequence (module docstring)."""
        return context * self.reduced_elems() + self.full_positions(context) * self.slot_elems

    def reserved_full_slots(self, context: int, block_size: int = PRICED_BLOCK_SIZE) -> int:
        """Full-width slots the window cache reserves for one ``context``-token request (module docstring)."""
        blocks = window_cache_blocks(self.window, self.sink_tokens, block_size, RESERVED_TAILS)
        return min(context, blocks * block_size)

    def read_elems(self, context: int) -> int:
        """K/V elements one decode step reads for a sequence at ``context`` tokens, the fresh one included."""
        full = self.full_positions(context)
        return (context - full) * self.reduced_elems() + full * self.slot_elems


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
    def kv_elems(self, context: int) -> int:
        """K/V elements the DAR caches hold for one sequence of ``context`` tokens, all layers."""
        return sum(self.layer(i).held_elems(context) for i in range(self.shape.num_layers))

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
        far = context * self.far_elems_per_token()
        window = self.kv_elems(context) - far
        far_itemsize = itemsize if far_itemsize is None else far_itemsize
        return (window * itemsize / tp_size + far * far_itemsize / self.far_shards(tp_size)) / context

    def reserved_fraction(self, context: int, block_size: int = PRICED_BLOCK_SIZE) -> float:
        """What the caches reserve for one ``context``-token request at ``block_size``-token window blocks, over
        what full attention holds: windows as the window cache reserves them (``LayerDar.reserved_full_slots``),
        far caches in whole padded pages (``reserved_far_elems``). What the calibrated schedule's budget counts."""
        elems = sum(reserved_far_elems(context, block_size, lay.slot_elems, lay.reduced_elems())
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
        read = [(lay.read_elems(context), (context - lay.full_positions(context)) * lay.reduced_elems())
                for lay in layers]  # (all, far) elements read
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
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_json(cls, section, shape: ModelShape) -> DarConfig:
        if not isinstance(section, dict):
            raise DarConfigError(f"dar: expected an object, got {type(section).__name__}")
        known = {"format_version", "method", "head_sharing", "sink_tokens", "projection_file",
                 "window", "key_rank", "value_rank", "extra"}
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
                f"method {self.method}")

