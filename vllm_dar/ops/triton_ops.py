"""Launchers for the Triton DAR kernels (``vllm_dar.kernels``): cache write and paged attention.

Same contract as ``vllm_dar.ops.paged`` (layouts, what each cache holds, semantics); the tests in
``tests/kernels`` compare both launchers with ``vllm_dar.reference`` under ``TRITON_INTERPRET=1``.

Bytes moved per decode step: ``vllm_dar.config``'s byte model (``DarConfig.decode_bytes``).

Launch plan (no Python loop over requests; every grid is a function of tensor shapes only)
------------------------------------------------------------------------------------------
1. ``dar_query_project_kernel``, grid ``(cdiv(T, 16), H)``: ``q Q_h`` once per (token, head).
2. ``dar_far_kernel``, grid ``(T // BLOCK_M + R, G, splits)``: query tiles x projection groups x key splits.
3. ``dar_full_kernel``, grid ``(T // BLOCK_M + R, J)``: query tiles x KV heads; merges the splits, writes output.
A query tile is ``BLOCK_M`` tokens of one request times all query heads sharing the group (2.) or KV head (3.):
``ROWS = BLOCK_M * next_pow2(heads)``: 16 rows (the smallest MMA tile; smaller dots get padded to it) for
decode-only batches, 64 when the batch holds a prefill chunk (more queries per K/V load). Request r's tiles start at
``qsl[r] // BLOCK_M + r``, so ``T // BLOCK_M + R`` programs cover any batch; surplus programs exit at once. Keys go
by ``FAR_BLOCK_N`` / ``FULL_BLOCK_N`` positions per inner step; splits: ``num_splits``.

CUDA graphs
-----------
``dar_paged_attention_triton`` with device tensors for ``query_start_loc`` / ``seq_lens`` (int32, as vLLM keeps
them) is capturable: it reads no tensor value on the host (no ``.item()``, ``.tolist()``, ``int(tensor)``), its
grids and split count are functions of tensor shapes only, and its fp32 scratch (``q Q_h`` and the split partials)
comes from ``Workspace``: one grow-only buffer per device, allocated on the first call that needs more and reused
by every later call, so a replayed graph finds its scratch where it was captured. The window and far tables'
widths (their capacity) fix the split count, not the requests' lengths. Requests with no query tokens (vLLM pads a
replayed decode graph with them: ``query_start_loc`` repeats its last value, ``seq_lens`` holds 0 and the block
table rows the null block) own one tile each that exits at once, and tokens past ``query_start_loc[-1]`` belong to
no request: their output rows are not written.
"""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from vllm_dar.kernels.dar_attention import dar_far_kernel, dar_full_kernel, dar_query_project_kernel
from vllm_dar.kernels.dar_cache import dar_write_kv_kernel
from vllm_dar.kv_dtype import is_fp8
from vllm_dar.ops.paged import PagedProjections

LOG2E = 1.4426950408889634
# Keys per inner step. Far: 64 positions x (rk + rv) reduced features, a small tile (decode: ``_far_plan``).
# Full width: 32 positions x D for K and V plus their 64-bit addresses; 64 made ptxas spill in the prefill tiles at
# D=64 (sm_80, ptxas -v).
FAR_BLOCK_N, FULL_BLOCK_N = 64, 32
BLOCK_T = 16  # tokens per query-projection program
DECODE_ROWS, PREFILL_ROWS = 16, 64  # rows (token x head) per attention program
MIN_KEYS_PER_SPLIT = 256  # below this, another split costs more (scratch, merge) than the parallelism it adds
MAX_SPLITS = 16
SCRATCH_BYTES = 64 << 20  # cap on the fp32 split partials


class Workspace:
    """Grow-only fp32 scratch, one buffer per device, shared by every launch on that device.

    ``take(device, numel)`` returns the first ``numel`` elements of the device's buffer, allocating a larger one
    (the next power of two) only when it is too small. Launches on one device run in stream order, and a launch
    consumes its scratch before it returns control to the stream, so layers can share it; two streams launching at
    once on one device would need a workspace each. Replaced buffers are kept, not freed: a CUDA graph captured
    with one keeps its address, and freeing it would let the allocator hand that memory to another tensor.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, list[Tensor]] = {}

    @staticmethod
    def _key(device: torch.device | str) -> torch.device:
        """``cuda`` and ``cuda:0`` name one buffer: a device without an index means the current one."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def take(self, device: torch.device, numel: int) -> Tensor:
        held = self._buffers.setdefault(self._key(device), [])
        if not held or held[-1].numel() < numel:
            held.append(torch.empty(triton.next_power_of_2(max(numel, 1)), dtype=torch.float32, device=device))
        return held[-1][:numel]

    def buffer(self, device: torch.device) -> Tensor | None:
        """The buffer ``take`` currently carves from (None before the first call on ``device``)."""
        held = self._buffers.get(self._key(device))
        return held[-1] if held else None


WORKSPACE = Workspace()  # the launchers' scratch


def split_scratch(device: torch.device, tokens: int, heads: int, rk_pad: int, rv_pad: int, splits: int,
                  workspace: Workspace = WORKSPACE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views of one ``workspace`` buffer: q_red [T, H, RK_PAD], part_max and part_sum [S, T, H], part_acc
    [S, T, H, RV_PAD] (contiguous, fp32, each starting on a 128-byte boundary so the kernels' pointers keep
    Triton's alignment assumptions; contents undefined until the kernels write them)."""
    shapes = ((tokens, heads, rk_pad), (splits, tokens, heads), (splits, tokens, heads),
              (splits, tokens, heads, rv_pad))
    sizes = [math.prod(shape) for shape in shapes]
    padded = [-(-n // 32) * 32 for n in sizes]  # 32 fp32 = 128 bytes
    flat = workspace.take(device, sum(padded))
    return tuple(part[:n].view(shape) for part, n, shape in zip(flat.split(padded), sizes, shapes))


def _pad(n: int, floor: int = 16) -> int:
    """Power-of-two tile width >= n; at least 16 (an MMA tile side) for dimensions that enter ``tl.dot``."""
    return max(floor, triton.next_power_of_2(n))


def _refuse_fp8(cache: Tensor) -> None:
    """The Triton kernels read caches in the model dtype; an FP8 cache would be misread (the plugin refuses
    ``--kv-cache-dtype fp8*`` on this path at start-up; this guards direct callers)."""
    if is_fp8(cache.dtype):
        raise NotImplementedError(f"vllm-dar: the Triton DAR kernels do not read {cache.dtype} caches")


def write_kv_triton(key: Tensor, value: Tensor, *, window_cache: Tensor, window_slots: Tensor, far_cache: Tensor,
                    far_slots: Tensor, proj: PagedProjections, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store the scheduled tokens' K/V: full width into the window cache, ``k_g K_g | v_g V_g`` into the far cache.
    Caches in the model dtype only (FP8 caches: ``_refuse_fp8``; ``k_scale`` / ``v_scale`` are the contract's).

    key, value: [T, J, D] post-RoPE; window_slots, far_slots: [T] flat slots (< 0 or in null block 0: skipped);
    window_cache: [nbw, J, Bw, 2D]; far_cache: [nbf, G, Bf, rk + rv]. Grid ``(T, G)``: one program per token and
    projection group reads the group's K/V once and writes both caches.
    """
    _refuse_fp8(window_cache)
    t = window_slots.shape[0]
    j, d = key.shape[1:]
    g, dg, rk = proj.k_down.shape
    rv = proj.v_down.shape[-1]
    assert window_cache.shape[1] == j and window_cache.shape[3] == 2 * d, "window cache is [nb, J, Bw, 2D]"
    assert far_cache.shape[1] == g and far_cache.shape[3] == rk + rv, "far cache is [nb, G, Bf, rk + rv]"
    assert dg == j // g * d and far_slots.shape[0] == t and key.shape[0] >= t and value.shape == key.shape
    assert key.stride(-1) == value.stride(-1) == window_cache.stride(-1) == far_cache.stride(-1) == 1
    assert proj.k_down.is_contiguous() and proj.v_down.is_contiguous()
    if t == 0:
        return
    dar_write_kv_kernel[(t, g)](
        key_ptr=key, value_ptr=value, window_cache_ptr=window_cache, window_slots_ptr=window_slots,
        far_cache_ptr=far_cache, far_slots_ptr=far_slots, k_down_ptr=proj.k_down, v_down_ptr=proj.v_down,
        stride_kt=key.stride(0), stride_kj=key.stride(1), stride_vt=value.stride(0), stride_vj=value.stride(1),
        stride_wb=window_cache.stride(0), stride_wj=window_cache.stride(1), stride_ws=window_cache.stride(2),
        stride_fb=far_cache.stride(0), stride_fg=far_cache.stride(1), stride_fs=far_cache.stride(2),
        HEAD_DIM=d, HEADS=j // g, DG_PAD=_pad(dg, 1), KEY_RANK=rk, VALUE_RANK=rv, RK_PAD=_pad(rk, 1),
        RV_PAD=_pad(rv, 1), WINDOW_BLOCK=window_cache.shape[2], FAR_BLOCK=far_cache.shape[2])


def num_splits(far_capacity: int, tokens: int, heads: int, rv_pad: int) -> int:
    """Key splits of the far pass: enough to spread a long history over the GPU, never more than the history
    (the block table's capacity, a shape, so the choice is static under CUDA graphs) or the scratch cap."""
    by_keys = min(MAX_SPLITS, triton.cdiv(far_capacity, MIN_KEYS_PER_SPLIT))
    by_scratch = SCRATCH_BYTES // max(1, tokens * heads * (rv_pad + 2) * 4)
    return max(1, min(by_keys, by_scratch))


def _far_plan(rows: int, rk_pad: int, rv_pad: int) -> tuple[int, dict]:
    """(BLOCK_N, launch options) of the far pass. A decode tile (``DECODE_ROWS``, mostly padding: one token's
    heads) does little arithmetic per key, so the pass is bound by how many key loads are in flight: fewer warps per
    program (more programs per SM) and, for wider reduced rows, longer key steps. Chosen by an H200 sweep
    (``benchmarks/kernels_tune.py``; README, "GPU") for the padded widths it measured, rk + rv = 32 and 64; other
    widths (the recipe's joint layers reach 256) and prefill tiles keep Triton's defaults until measured."""
    if rows == DECODE_ROWS and rk_pad + rv_pad == 64:
        return 128, {"num_warps": 4, "num_stages": 2}
    if rows == DECODE_ROWS and rk_pad + rv_pad <= 32:
        return 64, {"num_warps": 2, "num_stages": 2}
    return FAR_BLOCK_N, {}


def _rows_plan(heads: int, rows: int) -> tuple[int, int]:
    """(HEADS_PAD, BLOCK_M) for programs holding all ``heads`` of a group or KV head."""
    heads_pad = triton.next_power_of_2(heads)
    return heads_pad, max(1, rows // heads_pad)


def _check(query, key, value, output, window_cache, window_table, far_cache, far_table, proj) -> None:
    t, h, d = query.shape
    j, g = key.shape[1], far_cache.shape[1]
    rk, rv = proj.k_down.shape[-1], proj.v_down.shape[-1]
    assert key.shape == value.shape == (t, j, d) and output.shape == query.shape, "query/output [T,H,D], kv [T,J,D]"
    assert h % j == 0 and j % g == 0, f"heads {h} must be a multiple of KV heads {j}, KV heads of groups {g}"
    assert window_cache.shape[1] == j and window_cache.shape[3] == 2 * d, "window cache is [nb, J, Bw, 2D]"
    assert far_cache.shape[3] == rk + rv, "far cache is [nb, G, Bf, rk + rv]"
    assert proj.q_proj.shape == (h, d, rk) and proj.v_up.shape == (h, rv, d), "q_proj [H,D,rk], v_up [H,rv,D]"
    assert proj.q_proj.dtype == proj.v_up.dtype == torch.float32
    assert proj.q_proj.is_contiguous() and proj.v_up.is_contiguous()
    for x in (query, key, value, output, window_cache, far_cache, window_table, far_table):
        assert x.stride(-1) == 1, "innermost dimension must be contiguous"


def dar_paged_attention_triton(query: Tensor, key: Tensor, value: Tensor, output: Tensor, *, window_cache: Tensor,
                               window_table: Tensor, far_cache: Tensor, far_table: Tensor,
                               query_start_loc: list[int] | Tensor, seq_lens: list[int] | Tensor,
                               proj: PagedProjections, window: int, sink_tokens: int, scale: float,
                               k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """DAR attention for a batch (decodes and prefill/extend chunks in any order), into ``output``. Caches in the
    model dtype only (``_refuse_fp8``).

    query: [T, H, D]; key, value: [T, J, D] (fresh, post-RoPE); output: [T, H, D]; window_cache [nbw, J, Bw, 2D]
    + window_table [R, *]; far_cache [nbf, G, Bf, rk + rv] + far_table [R, *]; query_start_loc: R + 1 offsets;
    seq_lens: R. Heads of a group must be contiguous (``head_group[h] == h // (H / G)``, as ``PagedProjections``
    builds it). Softmax and accumulators in fp32, dot operands in the cache dtype; writes ``output.dtype``.
    Lists or device tensors for ``query_start_loc`` / ``seq_lens``: int32 tensors on the device avoid a host copy
    per call and make the call capturable in a CUDA graph (module docstring, "CUDA graphs").
    """
    _refuse_fp8(window_cache)
    _check(query, key, value, output, window_cache, window_table, far_cache, far_table, proj)
    _launch(query, key, value, output, window_cache, window_table, far_cache, far_table, query_start_loc,
            seq_lens, proj, window, sink_tokens, scale, splits=None)


def _launch(query, key, value, output, window_cache, window_table, far_cache, far_table, query_start_loc,
            seq_lens, proj, window, sink_tokens, scale, *, splits: int | None) -> None:
    t, h, d = query.shape
    j, g = key.shape[1], far_cache.shape[1]
    rk, rv = proj.k_down.shape[-1], proj.v_down.shape[-1]
    dev = query.device
    qsl = torch.as_tensor(query_start_loc, dtype=torch.int32, device=dev)  # [R + 1]
    lens = torch.as_tensor(seq_lens, dtype=torch.int32, device=dev)  # [R]
    r = lens.shape[0]
    if t == 0 or r == 0:
        return
    d_pad, rk_pad, rv_pad = _pad(d), _pad(rk), _pad(rv)
    rows = DECODE_ROWS if t <= r else PREFILL_ROWS  # decode-only batches: one token per request
    splits = splits or num_splits(far_table.shape[1] * far_cache.shape[2], t, h, rv_pad)
    qk_scale = scale * LOG2E
    upcast = isinstance(dar_far_kernel, InterpretedFunction)  # the interpreter's bf16 tl.dot is wrong: see mma

    q_red, part_max, part_sum, part_acc = split_scratch(dev, t, h, rk_pad, rv_pad, splits)
    # q_red [T, H, RK_PAD]; part_max, part_sum [S, T, H]; part_acc [S, T, H, RV_PAD]
    dar_query_project_kernel[(triton.cdiv(t, BLOCK_T), h)](
        query_ptr=query, q_proj_ptr=proj.q_proj, q_red_ptr=q_red, num_tokens=t, qk_scale=qk_scale,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_rt=q_red.stride(0), stride_rh=q_red.stride(1),
        HEAD_DIM=d, D_PAD=d_pad, KEY_RANK=rk, RK_PAD=rk_pad, BLOCK_T=BLOCK_T)

    hp_pad, bm = _rows_plan(h // g, rows)
    far_block_n, far_options = _far_plan(rows, rk_pad, rv_pad)
    dar_far_kernel[(t // bm + r, g, splits)](
        q_red_ptr=q_red, far_cache_ptr=far_cache, far_table_ptr=far_table, part_max_ptr=part_max,
        part_sum_ptr=part_sum, part_acc_ptr=part_acc, query_start_loc_ptr=qsl, seq_lens_ptr=lens, num_reqs=r,
        num_splits=splits, window=window, sink_tokens=sink_tokens,
        stride_rt=q_red.stride(0), stride_rh=q_red.stride(1),
        stride_fb=far_cache.stride(0), stride_fg=far_cache.stride(1), stride_fs=far_cache.stride(2),
        stride_ftr=far_table.stride(0), stride_ps=part_max.stride(0), stride_pt=part_max.stride(1),
        stride_as=part_acc.stride(0), stride_at=part_acc.stride(1), stride_ah=part_acc.stride(2),
        KEY_RANK=rk, VALUE_RANK=rv, RK_PAD=rk_pad, RV_PAD=rv_pad, HEADS=h // g, HEADS_PAD=hp_pad, BLOCK_M=bm,
        FAR_BLOCK=far_cache.shape[2], BLOCK_N=far_block_n, DOT_UPCAST=upcast, **far_options)

    hp_pad, bm = _rows_plan(h // j, rows)
    dar_full_kernel[(t // bm + r, j)](
        query_ptr=query, key_ptr=key, value_ptr=value, output_ptr=output, window_cache_ptr=window_cache,
        window_table_ptr=window_table, v_up_ptr=proj.v_up, part_max_ptr=part_max, part_sum_ptr=part_sum,
        part_acc_ptr=part_acc, query_start_loc_ptr=qsl, seq_lens_ptr=lens, num_reqs=r, num_splits=splits,
        window=window, sink_tokens=sink_tokens, qk_scale=qk_scale,
        stride_qt=query.stride(0), stride_qh=query.stride(1), stride_ot=output.stride(0),
        stride_oh=output.stride(1), stride_kt=key.stride(0), stride_kj=key.stride(1), stride_vt=value.stride(0),
        stride_vj=value.stride(1), stride_wb=window_cache.stride(0), stride_wj=window_cache.stride(1),
        stride_ws=window_cache.stride(2), stride_wtr=window_table.stride(0), stride_ps=part_max.stride(0),
        stride_pt=part_max.stride(1), stride_as=part_acc.stride(0), stride_at=part_acc.stride(1),
        stride_ah=part_acc.stride(2), HEAD_DIM=d, D_PAD=d_pad, VALUE_RANK=rv, RV_PAD=rv_pad, HEADS=h // j,
        HEADS_PAD=hp_pad, BLOCK_M=bm, WINDOW_BLOCK=window_cache.shape[2], BLOCK_N=FULL_BLOCK_N,
        DOT_UPCAST=upcast, UP_PRECISION="ieee" if window_cache.dtype == torch.float32 else "tf32")
