"""The bytes-moved figures quoted in ``vllm_dar.ops.triton_ops``'s docstring follow from ``decode_bytes``."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="vllm_dar.ops.triton_ops imports triton")

from vllm_dar.ops import triton_ops


def test_docstring_numbers_for_the_default_model():
    # SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, D=64; fp16 cache; 4K context, w=64, ranks 16/16 per head.
    per_layer = triton_ops.decode_bytes(4096, num_heads=9, num_kv_heads=3, head_dim=64, groups=3, key_rank=16,
                                        value_rank=16, window=64, sink_tokens=0, itemsize=2)
    full, dar, proj = (30 * per_layer[k] for k in ("full", "dar", "projections"))
    assert (full, dar, proj) == (94_371_840, 24_698_880, 2_949_120)
    doc = triton_ops.__doc__
    for number in ("94,371,840", "24,698,880", "2,949,120"):
        assert number in doc
    assert f"{full / dar:.2f}x" in doc and f"{full / (dar + proj):.2f}x" in doc


def test_short_context_reads_no_far_bytes():
    """A context inside the window is full attention plus the fresh token's share: DAR saves nothing there."""
    b = triton_ops.decode_bytes(50, num_heads=9, num_kv_heads=3, head_dim=64, groups=3, key_rank=16, value_rank=16,
                                window=64, sink_tokens=4, itemsize=2)
    assert b["dar"] == b["full"]
