"""The paged CPU DAR path (vllm_dar.ops.paged) against the dense reference, on shuffled block tables.

Block 0 is reserved as the null block and filled with NaN, and every window-cache slot outside what the
window cache holds (sinks + the window before the chunk; the chunk's own K/V are passed fresh) is poisoned
with NaN too: reading anything the allocator may have freed or never allocated shows up.
Tolerance: fp32 in, fp32 out, different summation order -> 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from vllm_dar.ops.paged import PagedProjections, dar_paged_attention, reduce_tokens, write_slots
from vllm_dar.reference import dar_attention

from .test_cpp_ops import random_projections, take_blocks

H, J, D = 6, 3, 16


# (name, [(seq_len, q_len)], window, sinks, joint)
SCENARIOS = [
    ("small_decode", [(5, 1), (40, 1)], 8, 2, False),
    ("mixed", [(70, 70), (33, 1), (90, 17)], 16, 4, False),
    ("large_prefill_joint", [(200, 200)], 32, 4, True),
    ("window_zero", [(30, 5)], 0, 3, False),
    ("no_sinks", [(50, 50), (51, 1)], 8, 0, True),
    ("chunk_inside_sinks", [(10, 8), (12, 3)], 4, 4, False),
    ("window_beyond_history", [(20, 4), (7, 1)], 64, 2, True),
]


@pytest.mark.parametrize("name,reqs,window,sinks,joint", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_paged_matches_reference(name, reqs, window, sinks, joint):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rk, rv = 5, 7
    proj = random_projections(joint, (H, J, D, rk, rv))
    pp = PagedProjections.from_layer(proj, H)
    g = proj.groups
    wbs, fbs, nblocks = 8, 16, 64
    wcache = torch.full((nblocks, J, wbs, 2 * D), float("nan"))
    fcache = torch.full((nblocks, g, fbs, rk + rv), float("nan"))
    wtable = torch.zeros(len(reqs), 40, dtype=torch.long)
    ftable = torch.zeros(len(reqs), 40, dtype=torch.long)
    wfree = (torch.randperm(nblocks - 1, generator=gen) + 1).tolist()  # block 0: the null block
    ffree = (torch.randperm(nblocks - 1, generator=gen) + 1).tolist()
    queries, keys, values, refs, qsl = [], [], [], [], [0]
    for r, (seq_len, q_len) in enumerate(reqs):
        k, v = torch.randn(seq_len, J, D), torch.randn(seq_len, J, D)
        q = torch.randn(q_len, H, D)
        wrow, frow = take_blocks(wfree, seq_len, wbs), take_blocks(ffree, seq_len, fbs)
        wtable[r, : len(wrow)], ftable[r, : len(frow)] = wrow, frow
        pos = torch.arange(seq_len)
        first = seq_len - q_len
        kept = (pos < first) & ((pos < sinks) | (pos > first - max(window, 1)))  # what the window cache holds
        write_slots(wcache, torch.where(kept, wrow[pos // wbs] * wbs + pos % wbs, -1), k, v)
        write_slots(fcache, frow[pos // fbs] * fbs + pos % fbs, reduce_tokens(k, proj.k_down),
                    reduce_tokens(v, proj.v_down))
        ref = dar_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], proj,
                            window=window, sink_tokens=sinks, scale=0.3)
        queries.append(q)
        keys.append(k[first:])
        values.append(v[first:])
        refs.append(ref[0].transpose(0, 1))
        qsl.append(qsl[-1] + q_len)
    query = torch.cat(queries)
    out = torch.empty_like(query)
    dar_paged_attention(query, torch.cat(keys), torch.cat(values), out, window_cache=wcache, window_table=wtable, far_cache=fcache, far_table=ftable,
                        query_start_loc=qsl, seq_lens=[s for s, _ in reqs], proj=pp, window=window,
                        sink_tokens=sinks, scale=0.3)
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-5, atol=1e-5)
