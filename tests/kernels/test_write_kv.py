"""Triton cache write (``write_kv_triton``) against ``write_slots`` + ``reduce_tokens`` (plain PyTorch), natively
on CUDA or in the interpreter (``layout.kernel_device``); the reference writes on the CPU.

Both start from the same NaN caches; slots < 0 and slots in the null block 0 must stay untouched (NaN).
Tolerances: fp32 1e-5 (the reduction's summation order differs); bf16: one ulp of the stored value (2^-8
relative, plus an absolute floor for values near 0), since kernel and reference round slightly different fp32 sums.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (its interpreter runs them on the CPU)")

from vllm_dar.ops.paged import PagedProjections, reduce_tokens, write_slots
from vllm_dar.ops.triton_ops import write_kv_triton

from .layout import Shape, kernel_device, nan_cache, random_projections

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (8e-3, 1e-2)}  # (rtol, atol)
DEVICE = kernel_device()

# name: (shape (H, J, D, rk, rv[, joint]), tokens)
SCENARIOS = {
    "per_head_gqa3_r8": (Shape(9, 3, 16, 8, 8), 11),
    "per_head_gqa1_r32": (Shape(2, 2, 16, 32, 16), 7),
    "joint_r16": (Shape(9, 3, 16, 16, 16, joint=True), 9),
    "odd_sizes": (Shape(4, 2, 24, 12, 20), 5),
}


def slots_for(tokens: int, num_blocks: int, block: int, gen: torch.Generator, first_block: int = 0) -> torch.Tensor:
    """Distinct flat slots in blocks >= 1, with one token skipped (-1) and one sent to the null block 0."""
    base = max(1, first_block)
    flat = torch.randperm((num_blocks - base) * block, generator=gen)[:tokens] + base * block
    flat[1] = -1
    flat[3 % tokens] = 2  # block 0: the null block, never written
    return flat.to(torch.int64)


def check(shape: Shape, tokens: int, dtype, *, first_block: int = 0, window_block: int = 4, far_block: int = 8):
    gen = torch.Generator().manual_seed(1)
    proj = PagedProjections.from_layer(random_projections(shape, gen), shape.heads)
    j, d = shape.kv_heads, shape.head_dim
    key = torch.randn(tokens, j, d, generator=gen).to(dtype)  # [T, J, D]
    value = torch.randn(tokens, j, d, generator=gen).to(dtype)
    nb_w, nb_f = max(1, first_block) + 2 * tokens // window_block + 2, max(1, first_block) + tokens
    wslots = slots_for(tokens, nb_w, window_block, gen, first_block)
    fslots = slots_for(tokens, nb_f, far_block, gen, first_block)
    caches = []
    for device in (DEVICE, "cpu"):  # the kernel's, the reference's
        caches.append((nan_cache(nb_w, j, window_block, 2 * d, dtype, first_block, device),
                       nan_cache(nb_f, shape.groups, far_block, shape.key_rank + shape.value_rank, dtype,
                                 first_block, device)))
    (wk, fk), (wr, fr) = caches
    write_kv_triton(key.to(DEVICE), value.to(DEVICE), window_cache=wk, window_slots=wslots.to(DEVICE), far_cache=fk,
                    far_slots=fslots.to(DEVICE), proj=proj.to(DEVICE))
    keep_w, keep_f = wslots >= window_block, fslots >= far_block
    write_slots(wr, wslots[keep_w], key[keep_w], value[keep_w])
    write_slots(fr, fslots[keep_f], reduce_tokens(key[keep_f], proj.k_down), reduce_tokens(value[keep_f], proj.v_down))
    rtol, atol = TOL[dtype]
    lo = max(1, first_block) if first_block else 0  # huge caches: compare only the blocks that exist in memory
    torch.testing.assert_close(wk[lo:].cpu(), wr[lo:], rtol=0, atol=0, equal_nan=True)  # a copy: exact
    torch.testing.assert_close(fk[lo:].cpu(), fr[lo:], rtol=rtol, atol=atol, equal_nan=True)
    assert bool(wk[0].isnan().all()) and bool(fk[0].isnan().all()), "the null block was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_write_matches_reference(name, dtype):
    shape, tokens = SCENARIOS[name]
    check(shape, tokens, dtype)


def test_write_large_block_ids():
    """Slots above 2^31 elements into the caches (int64 slots; the offsets must not wrap in int32)."""
    check(Shape(3, 1, 16, 16, 16), 6, torch.bfloat16, first_block=1 << 24, far_block=4)
