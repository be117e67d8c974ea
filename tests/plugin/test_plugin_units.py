"""Fast checks of the plugin glue that need vLLM but no engine: registration, metadata builders and the window
manager."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch


def test_register_is_lazy_and_idempotent():
    code = (
        "import sys, vllm_dar\n"
        "vllm_dar.register(); vllm_dar.register()\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "from vllm_dar.plugin import BACKEND\n"
        "assert E.CPU_ATTN.get_path() == BACKEND, E.CPU_ATTN.get_path()\n"
        "heavy = [m for m in ('vllm_dar.plugin.cpu', 'vllm_dar.plugin.common', 'vllm_dar.ops.paged',\n"
        "                     'vllm.v1.attention.backends.cpu_attn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_each_dar_backend_builds_its_metadata():
    """Every DAR backend's builder slices the batch's R requests out of vLLM's buffers (3 slots, 2 requests):
    views of the buffers, no copy per step (on CPU the C++ op takes vLLM's int32 host tensors as they are)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_dar.plugin import cpu, cuda

    qsl, seq_lens = torch.tensor([0, 3, 4, 9], dtype=torch.int32), torch.tensor([10, 4, 7], dtype=torch.int32)
    table = torch.arange(12, dtype=torch.int32).view(3, 4)  # vLLM's block tables are int32
    m = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq_lens, num_reqs=2,
                                num_actual_tokens=4, max_query_len=3, max_seq_len=10, block_table_tensor=table,
                                slot_mapping=torch.arange(4))
    backends = [cpu.DarCpuWindowBackend, cpu.DarCpuFarBackend, cuda.DarCudaBackend, cuda.DarCudaWindowBackend,
                cuda.DarCudaFarBackend, cuda.DarCudaBackendOnCpu]
    for backend in backends:
        built = backend.get_builder_cls()(None, [], None, torch.device("cpu")).build(0, m)
        assert built.num_actual_tokens == 4
        assert built.block_table.tolist() == table[:2].tolist()
        assert built.query_start_loc.tolist() == [0, 3, 4] and built.seq_lens.tolist() == [10, 4], backend
        qsl_buffer = m.query_start_loc_cpu if backend.__module__ == cpu.__name__ else qsl
        assert built.block_table.data_ptr() == table.data_ptr(), backend
        assert built.query_start_loc.data_ptr() == qsl_buffer.data_ptr(), backend
        assert built.seq_lens.data_ptr() == seq_lens.data_ptr(), backend
        for x in (built.query_start_loc, built.seq_lens, built.block_table):
            assert x.dtype == torch.int32 and x.is_contiguous(), backend


def _manager(cls, spec, *, caching=False, alignment=None):
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=64, enable_caching=caching, hash_block_size=spec.block_size)
    return cls(spec, block_pool=pool, enable_caching=caching, kv_cache_group_id=0,
               scheduler_block_size=alignment or spec.block_size)


KW = {"block_size": 4, "num_kv_heads": 1, "head_size": 8, "dtype": torch.float32, "sliding_window": 6}


def _real(manager, request="r") -> list[bool]:
    return [not b.is_null for b in manager.req_to_blocks[request]]


def _step(manager, num_tokens: int, processed: int, prefill_end: int) -> None:
    """What vLLM's allocate_slots does for one step of one request."""
    manager.remove_skipped_blocks("r", processed)
    manager.get_num_blocks_to_allocate("r", num_tokens, [], processed, processed, num_tokens,
                                       prefill_end=prefill_end)
    manager.allocate_new_blocks("r", num_tokens, num_tokens)


def test_window_manager_allocates_sinks_and_tail_only():
    """A 40-token chunk (window 6, 3 sinks, blocks of 4): real blocks for the sinks (block 0) and the 5 positions
    the next step reads (35..39: blocks 8, 9); the stock sliding-window manager takes all 10."""
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from vllm_dar.plugin.spec import DarWindowManager, DarWindowSpec

    spec = DarWindowSpec(sink_tokens=3, **KW)
    manager, stock = _manager(DarWindowManager, spec), _manager(SlidingWindowManager, SlidingWindowSpec(**KW))
    _step(manager, 40, 0, 40)
    stock.allocate_new_blocks("r", 40, 40)
    assert _real(manager) == [True] + [False] * 7 + [True, True]
    assert _real(stock) == [True] * 10
    assert manager.block_pool.get_num_free_blocks() == 63 - 3


def test_window_manager_decode_holds_a_bounded_tail():
    """Decoding from 40 to 80 tokens: every position the next query sees at full width (sinks and the last
    w - 1) sits in a real block, and the request never holds more than the admission bound."""
    from vllm_dar.plugin.spec import DarWindowManager, DarWindowSpec

    spec = DarWindowSpec(sink_tokens=3, **KW)
    manager = _manager(DarWindowManager, spec)
    bound = spec.max_admission_blocks_per_request(max_in_flight_tokens=4096, max_model_len=10_000)
    assert bound == 1 + 3 * 3  # sinks + 3 tails of cdiv(5, 4) + 1 blocks: independent of the chunk size
    no_caching = DarWindowSpec(sink_tokens=3, replay_tail=False, **KW)
    assert no_caching.max_admission_blocks_per_request(max_in_flight_tokens=4096, max_model_len=10_000) == 7
    _step(manager, 40, 0, 40)
    for n in range(41, 81):
        _step(manager, n, n - 1, 40)
        real = _real(manager)
        assert sum(real) <= bound
        needed = {p // 4 for p in range(n - 5, n)} | {0}
        assert all(real[i] for i in needed), (n, real)
    # Admission of the same request's full sequence reserves a small, chunk-independent number of blocks.
    assert manager.get_num_blocks_to_allocate("q", 4000, [], 0, 0, 4000, apply_admission_cap=True,
                                              prefill_end=4000) <= bound


def test_window_manager_keeps_the_replay_tail_for_prefix_caching():
    """With prefix caching (hit alignment 8), a 40-token prompt also keeps the window before its last hit
    boundary (32: positions 27..31, blocks 6 and 7), so the same prompt again finds it in the cache."""
    from vllm_dar.plugin.spec import DarWindowManager, DarWindowSpec

    spec = DarWindowSpec(sink_tokens=3, **KW)
    manager = _manager(DarWindowManager, spec, caching=True, alignment=8)
    _step(manager, 40, 0, 40)
    assert _real(manager) == [True] + [False] * 5 + [True, True, True, True]
    _step(manager, 41, 40, 40)  # the window moves past them: freed to the cache, not held
    assert _real(manager) == [True] + [False] * 7 + [True, True, True]


def test_far_block_sizes_fit_the_window_page():
    from vllm_dar.config import far_block_sizes

    # SmolLM2: 3 KV heads x (64 + 64) per full slot; ranks 16/16 per head: 96 per reduced slot -> 4x the tokens.
    assert far_block_sizes(16, 384, [96, 96]) == [64, 64]
    # Per-layer ranks that do not divide: rounded down to the window block (16 * 384 / 88 = 69.8 -> 64).
    assert far_block_sizes(16, 384, [88, 96, 48]) == [64, 64, 128]
    # Multiples of the window block by divisors of 48 only (118 -> 96, 170 -> 128), so that any mix of layers has
    # a common multiple within 1024 tokens, vLLM's prefix-cache hit alignment.
    assert far_block_sizes(16, 384, [96, 88, 52, 36]) == [64, 64, 96, 128]  # exact: 64, 69, 118, 170
    # A far cache in FP8 beside a window in fp32 (--kv-cache-dtype fp8): sizes in bytes, 1536 per full slot,
    # 96 and 192 per reduced one -> 16x and 8x the tokens.
    assert far_block_sizes(16, 384 * 4, [96 * 1, 192 * 1]) == [256, 128]
    for window_block in (1, 16, 32, 128, 512):
        blocks = far_block_sizes(window_block, 384, list(range(8, 385, 8)))
        assert all(b % window_block == 0 and b * f <= window_block * 384 or b == window_block
                   for b, f in zip(blocks, range(8, 385, 8)))
        assert math.lcm(*blocks) <= 1024


def test_far_manager_frees_the_blocks_below_a_compacted_prompt():
    """Token budget 0.25 of the candidates, window 6, 3 sinks, W 4, far blocks of 4: a 40-token prompt has
    candidates [3, 35) (32), keeps 8, so s0 = 27 // 4 * 4 = 24. Nothing is freed during the prefill step; once
    it is processed, blocks 0-5 go back to the pool; decoding appends blocks as usual; a preempted request that
    comes back is compacted at its new prefill end (prompt + output so far)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_dar.plugin.spec import DarFarManager, DarFarSpec

    spec = DarFarSpec(block_size=4, num_kv_heads=1, head_size=8, dtype=torch.float32, window=6, sink_tokens=3,
                      budget_kind="fraction", budget=0.25, observation_window=4)
    assert isinstance(spec, FullAttentionSpec) and spec.evict_below(40) == 24 and spec.evict_below(8) == 0
    # vLLM puts layers whose specs merge in one KV cache group (one block table): equal budgets only
    assert DarFarSpec.merge([spec, spec]) == spec
    with pytest.raises(ValueError):
        DarFarSpec.merge([spec, dataclasses.replace(spec, budget=0.5)])
    manager = _manager(DarFarManager, spec)
    _step(manager, 40, 0, 40)
    assert _real(manager) == [True] * 10 and manager.block_pool.get_num_free_blocks() == 63 - 10
    _step(manager, 41, 40, 41)  # the prefill step was processed: compaction done in the worker
    assert _real(manager) == [False] * 6 + [True] * 5
    assert manager.block_pool.get_num_free_blocks() == 63 - 5
    for n in range(42, 50):
        _step(manager, n, n - 1, n)  # vLLM's prefill_end grows with a decoding request: no second eviction
    assert _real(manager) == [False] * 6 + [True] * 7
    manager.free("r")
    assert manager.block_pool.get_num_free_blocks() == 63
    _step(manager, 49, 0, 49)  # resumed: recomputes 49 tokens; candidates [3, 44), keeps 10 -> s0 = 32
    _step(manager, 50, 49, 50)
    assert _real(manager) == [False] * 8 + [True] * 5
