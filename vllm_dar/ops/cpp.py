"""Launchers of the C++ CPU ops (``kernels/cpu/``, installed as ``vllm_dar.kernels``): build and load them, check
and normalise the arguments, call ``torch.ops.vllm_dar.dar_attention`` / ``dar_write``.

The ops are built on first use by ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; ``scripts/setup.sh`` builds them once).
Their schemas (``kernels/cpu/torch_bindings.cpp``) mark what each mutates. Semantics are the contract's
(``vllm_dar.ops.paged``); tests: ``tests/ops/test_cpp_ops.py``.

Both ops read and write vLLM's paged caches in place: caches whose blocks are dense but may sit apart (vLLM pads
the pages of layers with smaller ranks) are addressed through ``stride(0)`` (``dense_blocks``).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

import vllm_dar.kernels
from vllm_dar.ops.paged import PagedProjections

# (query, head) rows per work item of the attention kernel: 16 queries x 9 heads (joint SmolLM2), 48 x 3 (per
# head). A prefill item transposes its window's keys once for all its rows: larger items share more of that, at
# the cost of far scores past the first queries' horizon (benchmarks/attention_cpu.py, README).
ROWS_PER_ITEM = 144
_SOURCES = ("dar_attention.cpp", "dar_write.cpp", "torch_bindings.cpp")
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]


@functools.cache
def load() -> bool:
    """Build (or load from the cache) the ops into this process; False, with a logged warning, when they cannot
    be built (no compiler, no ninja)."""
    from torch.utils.cpp_extension import load as load_extension

    src = Path(vllm_dar.kernels.__file__).parent / "cpu"
    try:
        load_extension(name="vllm_dar_cpu_ops", sources=[str(src / s) for s in _SOURCES], extra_cflags=_CFLAGS,
                       extra_ldflags=["-fopenmp"], extra_include_paths=[str(src)], is_python_module=False,
                       verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: the caller falls back to the reference ops
        logging.getLogger(__name__).warning("vllm-dar: the C++ CPU ops could not be built (%s)", e)
        return False
    return True


def _ops():
    """``torch.ops.vllm_dar``, built and loaded."""
    if not load():
        raise RuntimeError("vllm-dar: the C++ CPU ops could not be built (see the warning above); "
                           "use VLLM_DAR_OPS=reference")
    return torch.ops.vllm_dar


def simd() -> str:
    """The vector ISA the attention op was built with (``-march=native``): ``"avx512"``, ``"avx2"`` (AVX2 + FMA +
    F16C) or ``"none"`` (its scalar loops, which do not read FP8 caches)."""
    return _ops().simd()


def dense_blocks(cache: Tensor) -> bool:
    """A [blocks, heads, block_size, width] cache whose every block is dense; the block stride may exceed a
    block's size (padded pages), which the kernels take as ``stride(0)``."""
    _, h, b, c = cache.shape
    return cache.stride()[1:] == (b * c, c, 1) and cache.stride(0) >= h * b * c


def _rows_contiguous(x: Tensor) -> bool:
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def _slots(x: Tensor) -> Tensor:
    """Slot mapping as the write op takes it: int64, contiguous (no copy when it already is)."""
    return x if x.dtype == torch.int64 and x.is_contiguous() else x.long().contiguous()


def _i32(x: Tensor | list[int]) -> Tensor:
    """An int32 contiguous host tensor of offsets or block ids (vLLM's own dtype for them: no copy when it
    already is one)."""
    if isinstance(x, Tensor):
        return x if x.dtype == torch.int32 and x.is_contiguous() else x.int().contiguous()
    return torch.tensor(x, dtype=torch.int32)


def dar_paged_attention_cpp(query: Tensor, key: Tensor, value: Tensor, output: Tensor, *, window_cache: Tensor,
                            window_table: Tensor, far_cache: Tensor, far_table: Tensor,
                            query_start_loc: list[int] | Tensor, seq_lens: list[int] | Tensor,
                            proj: PagedProjections, window: int, sink_tokens: int, scale: float,
                            k_scale: float = 1.0, v_scale: float = 1.0, rows_per_item: int = ROWS_PER_ITEM) -> None:
    """``vllm_dar.ops.paged.dar_paged_attention`` for the whole batch in one kernel call.

    query [T, H, D]; key, value [T, J, D]; output [T, H, D] with each token's rows contiguous (any token stride;
    query, key, value are copied only if theirs are not); caches with dense blocks (``dense_blocks``); block
    tables, ``query_start_loc`` and ``seq_lens`` as lists or host tensors (int32 and contiguous, as vLLM keeps them:
    used as they are; anything else is converted per call); both caches in the query dtype, the far cache in FP8,
    or both in one FP8 dtype (``k_scale`` / ``v_scale``: FP8 caches' scales). ``rows_per_item``: (query, head) rows
    per work item. The op itself checks dtypes, shapes and strides
    (``check_attention_args``), naming the argument.
    """
    if not _rows_contiguous(query):
        query = query.contiguous()
    if not (_rows_contiguous(key) and _rows_contiguous(value) and key.stride(0) == value.stride(0)):
        key, value = key.contiguous(), value.contiguous()  # the kernel takes one token stride for both
    _ops().dar_attention(
        query, key, value, output, _i32(query_start_loc), _i32(seq_lens), window_cache, _i32(window_table),
        far_cache, _i32(far_table), proj.q_proj, proj.v_up, window, sink_tokens, scale, rows_per_item, k_scale,
        v_scale)


def write_kv_cpp(key: Tensor, value: Tensor, *, window_cache: Tensor, window_slots: Tensor, far_cache: Tensor,
                 far_slots: Tensor, proj: PagedProjections, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """``vllm_dar.ops.paged.write_kv`` in one kernel call (same semantics; the reduction sums in fp32; FP8 caches
    store exactly what ``vllm_dar.kv_dtype.quantize`` gives).

    key, value [T, J, D] fp32 / bf16 (copied only if a token's [J, D] is not contiguous); caches in the pairs of
    dtypes ``dar_paged_attention_cpp`` takes; slots [T] int64 (vLLM's; anything else is converted); caches with
    dense blocks (``dense_blocks``). The op itself checks
    dtypes, shapes and strides, naming the argument.
    """
    if not (_rows_contiguous(key) and _rows_contiguous(value)):
        key, value = key.contiguous(), value.contiguous()
    _ops().dar_write(key, value, window_cache, _slots(window_slots), far_cache, _slots(far_slots), proj.k_down,
                     proj.v_down, k_scale, v_scale)
