"""Fast checks of the plugin glue that need vLLM but no engine: registration and the window manager."""
from __future__ import annotations

import subprocess
import sys

import torch


def test_register_is_lazy_and_idempotent():
    code = (
        "import sys, vllm_dar\n"
        "vllm_dar.register(); vllm_dar.register()\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum as E\n"
        "from vllm_dar.plugin import BACKEND\n"
        "assert E.CPU_ATTN.get_path() == BACKEND, E.CPU_ATTN.get_path()\n"
        "heavy = [m for m in ('vllm_dar.plugin.backend', 'vllm_dar.plugin.impl', 'vllm_dar.ops.paged',\n"
        "                     'vllm.v1.attention.backends.cpu_attn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _manager(cls, spec):
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_gpu_blocks=32, enable_caching=False, hash_block_size=spec.block_size)
    return cls(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
               scheduler_block_size=spec.block_size), pool


def test_window_manager_keeps_sink_blocks():
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from vllm_dar.plugin.spec import DarWindowManager, DarWindowSpec

    kw = {"block_size": 4, "num_kv_heads": 1, "head_size": 8, "dtype": torch.float32, "sliding_window": 6}
    spec = DarWindowSpec(sink_tokens=3, **kw)
    manager, _ = _manager(DarWindowManager, spec)
    stock, _ = _manager(SlidingWindowManager, SlidingWindowSpec(**kw))
    for m in (manager, stock):
        m.allocate_new_blocks("r", 40, 40)  # 10 blocks
        m.remove_skipped_blocks("r", 40)  # positions < 35 leave the window: blocks 0..7
    kept = [not b.is_null for b in manager.req_to_blocks["r"]]
    assert kept == [True] + [False] * 7 + [True, True]  # block 0 holds the 3 sink tokens
    assert [not b.is_null for b in stock.req_to_blocks["r"]] == [False] * 8 + [True, True]
    # The admission bound counts the sink block.
    stock_bound = SlidingWindowSpec(**kw).max_admission_blocks_per_request(16, 1000)
    assert spec.max_admission_blocks_per_request(16, 1000) == stock_bound + 1
    assert DarWindowSpec(sink_tokens=0, **kw).max_admission_blocks_per_request(16, 1000) == stock_bound
