"""Triton DAR paged attention (``dar_paged_attention_triton``) against the dense reference, natively on CUDA or in
the interpreter (``layout.kernel_device``).

Batches come from ``layout.build_batch``: shuffled block tables, block 0 a NaN null block, every slot outside the
contract NaN. Tolerances: fp32 1e-5 (same math, other summation order and exp2 for exp); bf16 2e-2 (one bf16 ulp
at |x| < 4, the largest outputs here): the kernels round P and the reduced query to bf16 for the tensor-core dots
(as flash attention does), the far cache holds the reduced K/V rounded to bf16 while the reference reduces the bf16
K/V in fp32 and never rounds them, and the output is rounded to bf16. Measured worst case: 1.6e-2 at |x| ~ 2-3.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (its interpreter runs them on the CPU)")

from vllm_dar.ops import triton_ops
from vllm_dar.ops.triton_ops import dar_paged_attention_triton

from .layout import Shape, build_batch, kernel_device

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SCALE = 0.3
DEVICE = kernel_device()

# name: (requests [(seq_len, q_len)], shape (H, J, D, rk, rv[, joint]), window, sinks, block table dtype[, blocks]);
# blocks: (window block, far block) tokens, default (8, 16); the plugin uses 16 and a multiple of 16 (64 at 16/16)
SCENARIOS = {
    "single_decode": ([(37, 1)], Shape(3, 3, 16, 16, 16), 8, 2, torch.int64),  # GQA 1
    "decode_batch": ([(37, 1), (5, 1), (64, 1), (129, 1)], Shape(8, 1, 16, 16, 8), 16, 4, torch.int32),  # GQA 8
    "mixed_batch": ([(70, 70), (33, 1), (25, 0), (90, 17), (5, 1)], Shape(9, 3, 16, 8, 8), 16, 4, torch.int32),
    "decode_wide_ranks": ([(400, 1), (77, 1), (12, 1)], Shape(8, 2, 16, 32, 32), 16, 2, torch.int32, (16, 64)),  # far
    # key steps of 128 (triton_ops._far_plan: decode with rk + rv == 64), spanning pages; a request with no far keys
    "long_history": ([(600, 1), (300, 3)], Shape(8, 1, 16, 32, 16), 32, 4, torch.int64, (16, 64)),  # far splits
    "window_larger_than_history": ([(20, 1), (12, 12), (40, 3)], Shape(6, 2, 16, 16, 32), 64, 0, torch.int32),
    "window_zero": ([(30, 5), (9, 1)], Shape(8, 1, 16, 16, 16), 0, 3, torch.int64),
    "window_one": ([(25, 4)], Shape(3, 3, 16, 8, 16), 1, 0, torch.int32),
    "joint_chunk_past_window": ([(130, 40), (51, 1)], Shape(9, 3, 16, 16, 16, joint=True), 16, 2, torch.int64,
                                (16, 48)),
    "odd_sizes": ([(45, 1), (33, 6)], Shape(4, 2, 24, 12, 20), 8, 1, torch.int32),  # D, ranks not powers of 2
}


def batch_of(name: str, dtype=torch.float32):
    reqs, shape, window, sinks, table_dtype, *blocks = SCENARIOS[name]
    wb, fb = blocks[0] if blocks else (8, 16)
    return build_batch(reqs, shape, window=window, sinks=sinks, dtype=dtype, table_dtype=table_dtype,
                       window_block=wb, far_block=fb, device=DEVICE), window, sinks


def run(batch, *, window: int, sinks: int) -> torch.Tensor:
    """The kernels' output for ``batch``, on the CPU."""
    out = torch.full_like(batch.query, float("nan"))
    dar_paged_attention_triton(batch.query, batch.key, batch.value, out,
                               **batch.kwargs(window=window, sink_tokens=sinks, scale=SCALE))
    return out.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_reference(name, dtype):
    batch, window, sinks = batch_of(name, dtype)
    out = run(batch, window=window, sinks=sinks)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), batch.reference.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_far_splits_agree(splits):
    """Any number of far splits gives the same softmax (the log-sum-exp merge is exact up to rounding)."""
    b, window, sinks = batch_of("long_history")
    out = torch.full_like(b.query, float("nan"))
    triton_ops._launch(b.query, b.key, b.value, out, b.window_cache, b.window_table, b.far_cache, b.far_table,
                       b.query_start_loc, b.seq_lens, b.proj, window, sinks, SCALE, splits=splits)
    torch.testing.assert_close(out.cpu(), b.reference, rtol=1e-5, atol=1e-5)


def test_large_block_ids():
    """Block ids above 2^24 with int32 tables: block * block stride passes 2^31 elements, so an offset kept in
    int32 reads the wrong slot (or crashes). The caches are ~4.3 GB of virtual memory each, touched only at the
    blocks in use."""
    reqs, shape = [(40, 1), (20, 4)], Shape(3, 1, 16, 16, 16)
    b = build_batch(reqs, shape, window=8, sinks=2, dtype=torch.bfloat16, window_block=4, far_block=4,
                    table_dtype=torch.int32, first_block=1 << 24, device=DEVICE)
    for cache, table in ((b.far_cache, b.far_table), (b.window_cache, b.window_table)):
        assert cache.stride(0) * int(table[table > 0].min()) >= 1 << 31
    out = run(b, window=8, sinks=2)
    torch.testing.assert_close(out.float(), b.reference.float(), rtol=2e-2, atol=2e-2)


def test_padding_tokens_untouched():
    """Tokens after query_start_loc[-1] (CUDA-graph padding) belong to no request: their output is not written."""
    reqs, shape, window, sinks, table_dtype = SCENARIOS["single_decode"]
    b = build_batch(reqs + [(12, 1)], shape, window=window, sinks=sinks, table_dtype=table_dtype, device=DEVICE)
    pad = 3
    query = torch.cat([b.query, torch.randn(pad, *b.query.shape[1:], device=DEVICE)])
    key = torch.cat([b.key, torch.randn(pad, *b.key.shape[1:], device=DEVICE)])
    value = torch.cat([b.value, torch.randn(pad, *b.value.shape[1:], device=DEVICE)])
    out = torch.full_like(query, 7.0)
    dar_paged_attention_triton(query, key, value, out, **b.kwargs(window=window, sink_tokens=sinks, scale=SCALE))
    out = out.cpu()
    torch.testing.assert_close(out[:-pad], b.reference, rtol=1e-5, atol=1e-5)
    assert bool((out[-pad:] == 7.0).all())


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    """Random mixes (1-token sequences, whole-sequence prefills, decodes, empty requests, any window and sinks)."""
    g = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    reqs = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        seq_len = int(torch.randint(1, 160, (1,), generator=g))
        reqs.append((seq_len, pick([0, 1, 1, seq_len, min(seq_len, 7)])))
    shape = pick([Shape(4, 2, 16, 8, 16), Shape(6, 3, 16, 16, 8, joint=True), Shape(8, 1, 16, 16, 16)])
    window, sinks = pick([0, 1, 5, 16, 64]), pick([0, 1, 3])
    b = build_batch(reqs, shape, window=window, sinks=sinks, seed=seed, window_block=pick([4, 16]),
                    far_block=pick([16, 48]), device=DEVICE)
    torch.testing.assert_close(run(b, window=window, sinks=sinks), b.reference, rtol=1e-5, atol=1e-5)
