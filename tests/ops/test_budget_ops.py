"""Token budgets on the paged ops: a prompt prefilled, compacted (``compact_prompts``: the kept candidates moved),
its far table read with the blocks below them null (``null_below``, as the plugin reads it once the scheduler's
``DarFarManager`` freed them), then decoded token by token. The C++
and reference ops must equal the dense reference with ``select_kept``'s eviction at the far cache's block size:
the kept candidates moved, the evicted ones unreadable (the null block is NaN, so a read of it shows up).
Tolerance: fp32, different summation order: 1e-5. FP8 far cache: the C++ op against the reference ops on the
same compacted cache (the selection reads FP8 keys, so the dense reference's fp32 selection may differ)."""
from __future__ import annotations

import pytest
import torch

from vllm_dar.config import BudgetConfig
from vllm_dar.ops import select_ops
from vllm_dar.ops.paged import PagedProjections, compact_prompts, far_start, null_below
from vllm_dar.reference import dar_attention, select_kept

from .test_cpp_ops import random_projections, take_blocks

DIMS = (6, 3, 16, 5, 7)  # H, J, D, rk, rv
WBS, FBS, NBLOCKS, SCALE = 8, 16, 128, 0.3


def run(kind: str, joint: bool, budget: BudgetConfig, prompt: int, decode: int, window: int, sinks: int,
        far_dtype: torch.dtype = torch.float32):
    """(outputs of the decode steps [decode, H, D], the dense reference's, s0) for one request."""
    h, j, d, rk, rv = DIMS
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    proj = random_projections(joint, DIMS)
    pp = PagedProjections.from_layer(proj, h)
    ops = select_ops(kind)
    total = prompt + decode
    q, k, v = torch.randn(total, h, d), torch.randn(total, j, d), torch.randn(total, j, d)
    wcache = torch.full((NBLOCKS, j, WBS, 2 * d), float("nan"))
    fcache = torch.full((NBLOCKS, proj.groups, FBS, rk + rv), float("nan")).to(far_dtype)
    wrow = take_blocks((torch.randperm(NBLOCKS - 1, generator=gen) + 1).tolist(), total, WBS)
    frow = take_blocks((torch.randperm(NBLOCKS - 1, generator=gen) + 1).tolist(), total, FBS)
    wtable = torch.zeros(1, 32, dtype=torch.int32)
    ftable = torch.zeros(1, 32, dtype=torch.int32)
    wtable[0, :len(wrow)], ftable[0, :len(frow)] = wrow.int(), frow.int()

    def write(a, b):
        pos = torch.arange(a, b)
        ops.write(k[a:b], v[a:b], window_cache=wcache, window_slots=wrow[pos // WBS] * WBS + pos % WBS,
                  far_cache=fcache, far_slots=frow[pos // FBS] * FBS + pos % FBS, proj=pp)

    write(0, prompt)  # the prefill step: write, attend (not compared here), then compact
    starts = compact_prompts(q[:prompt], far_cache=fcache, far_table=ftable, query_start_loc=[0, prompt],
                             seq_lens=[prompt], is_prefilling=[True], proj=pp, budget=budget, layer=0,
                             window=window, sink_tokens=sinks, scale=SCALE)
    s0, _ = budget.kept_span(0, prompt, window, sinks, FBS)
    assert starts == {0: s0}
    before = ftable.clone()
    ftable = null_below(ftable, torch.tensor([s0], dtype=torch.int32), FBS)  # what the plugin's reads see
    assert torch.equal(before[0, s0 // FBS:], ftable[0, s0 // FBS:]) and not ftable[0, :s0 // FBS].any()
    assert far_start(ftable[0], FBS, sinks) == max(sinks, s0)
    outs = []
    for t in range(prompt, total):
        write(t, t + 1)
        out = torch.empty(1, h, d)
        ops.attend(q[t:t + 1], k[t:t + 1], v[t:t + 1], out, window_cache=wcache, window_table=wtable,
                   far_cache=fcache, far_table=ftable, query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                   seq_lens=torch.tensor([t + 1], dtype=torch.int32), proj=pp, window=window, sink_tokens=sinks,
                   scale=SCALE)
        outs.append(out[0])
    qd, kd, vd = (x.transpose(0, 1)[None] for x in (q, k, v))
    evicted = select_kept(qd, kd, proj, budget, 0, window=window, sink_tokens=sinks, prompt_len=prompt, scale=SCALE,
                          far_block=FBS)
    ref = dar_attention(qd, kd, vd, proj, window=window, sink_tokens=sinks, scale=SCALE, evicted=evicted,
                        prompt_len=prompt)[0].transpose(0, 1)[prompt:]
    return torch.stack(outs), ref, s0


# (name, budget, prompt, decode, window, sinks)
CASES = [
    ("fraction", BudgetConfig(kind="fraction", per_layer=(0.25,), observation_window=6, pool_kernel=3), 150, 4, 8, 2),
    ("tokens_max_pool", BudgetConfig(kind="tokens", per_layer=(20,), observation_window=4, pool_kernel=5), 120, 3,
     16, 4),
    ("none_kept_avg", BudgetConfig(kind="fraction", per_layer=(0.0,), observation_window=8, pooling="avg"), 100, 3,
     8, 0),
]


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("kind", ["cpp", "reference"])
@pytest.mark.parametrize("name,budget,prompt,decode,window,sinks", CASES, ids=[c[0] for c in CASES])
def test_compacted_prompt_decodes_like_the_reference(name, budget, prompt, decode, window, sinks, kind, joint):
    got, want, s0 = run(kind, joint, budget, prompt, decode, window, sinks)
    assert s0 >= FBS  # blocks were freed: the case tests eviction
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nothing_evicted_when_no_block_would_be_freed():
    """Keeping 90% of 41 candidates ([2, 43)) leaves 6 to evict, no whole 16-token block: everything stays."""
    budget = BudgetConfig(kind="fraction", per_layer=(0.9,), observation_window=4)
    got, want, s0 = run("reference", False, budget, 50, 2, 8, 2)
    assert s0 == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("far_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_far_cache_compacts_as_stored(far_dtype):
    budget = CASES[0][1]
    cpp_out, _, _ = run("cpp", True, budget, 150, 3, 8, 2, far_dtype)
    ref_out, _, _ = run("reference", True, budget, 150, 3, 8, 2, far_dtype)
    assert torch.isfinite(cpp_out).all()
    torch.testing.assert_close(cpp_out, ref_out, rtol=1e-5, atol=1e-5)
