"""The C++ CPU DAR ops (vllm_dar.ops.cpp) and the reference ops (vllm_dar.ops.paged, their fallback) against the
dense reference, on shuffled paged layouts.

Each request's blocks come shuffled from a shared pool; block 0 is the null block. Every slot the contract says
is not valid at attention time is NaN: window-cache slots outside the sinks and the history window (and the
current chunk, whose K/V come fresh), far-cache slots at or past ``seq_len``, and all unused blocks.
Tolerances: fp32 1e-5 (same math, different summation order). bf16: the op reads bf16 caches and writes bf16;
the reference computes in fp32 from the same bf16 inputs, so the gap is bf16 rounding of the stored reduced
K/V and of the output (2^-8 relative each): 2e-2.
"""
from __future__ import annotations

import functools
import platform
import sys

import pytest
import torch

from vllm_dar.ops import DarOps, cpp, paged, select_ops
from vllm_dar.ops.paged import PagedProjections, reduce_tokens, write_slots
from vllm_dar.reference import LayerProjections, dar_attention

SMALL = (6, 3, 16, 5, 7)  # (H, J, D, rk, rv): odd ranks, the kernel's generic instantiation
RECIPE = (9, 3, 64, 24, 40)  # joint-recipe-like ranks: a masked rank tile and a masked value chunk
HD128 = (8, 2, 128, 16, 48)  # Llama-8B-like head_dim: the full-width rows go two at a time
SMOL = (9, 3, 64, 16, 16)  # SmolLM2-135M with r=16/16: the kernel's specialised instantiation
WBS, FBS, NBLOCKS = 8, 16, 256
SCALE = 0.3


def random_projections(joint: bool, dims) -> LayerProjections:
    """Random projections for dims (H, J, D, rk, rv), per head or one joint group (also used by test_paged_ops)."""
    _, J, D, RK, RV = dims
    g = 1 if joint else J
    dg = D * J // g
    return LayerProjections(q_proj=torch.randn(J, D, RK) / D ** 0.5, k_down=torch.randn(g, dg, RK) / dg ** 0.5,
                            v_down=torch.randn(g, dg, RV) / dg ** 0.5, v_up=torch.randn(J, RV, D) / RV ** 0.5)


def take_blocks(free: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """The next shuffled blocks of a shared pool for one request's table row."""
    n = -(-num_tokens // block_size)
    ids, free[:] = free[:n], free[n:]
    return torch.tensor(ids)


def build_batch(reqs, window: int, sinks: int, joint: bool, dtype: torch.dtype, dims=SMALL):
    """Paged caches, fresh K/V and queries for requests [(seq_len, q_len)], plus the reference output."""
    H, J, D, RK, RV = dims
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    proj = random_projections(joint, dims)
    wcache = torch.full((NBLOCKS, J, WBS, 2 * D), float("nan"), dtype=dtype)
    fcache = torch.full((NBLOCKS, proj.groups, FBS, RK + RV), float("nan"), dtype=dtype)
    wtable = torch.zeros(len(reqs), 64, dtype=torch.int32)  # int32 like vLLM's block tables
    ftable = torch.zeros(len(reqs), 64, dtype=torch.int32)
    wfree = (torch.randperm(NBLOCKS - 1, generator=gen) + 1).tolist()  # block 0: the null block
    ffree = (torch.randperm(NBLOCKS - 1, generator=gen) + 1).tolist()
    qs, ks, vs, refs, qsl = [], [], [], [], [0]
    for r, (seq_len, q_len) in enumerate(reqs):
        k, v = torch.randn(seq_len, J, D).to(dtype), torch.randn(seq_len, J, D).to(dtype)
        q = torch.randn(q_len, H, D).to(dtype)
        wrow, frow = take_blocks(wfree, seq_len, WBS), take_blocks(ffree, seq_len, FBS)
        wtable[r, : len(wrow)], ftable[r, : len(frow)] = wrow.int(), frow.int()
        pos = torch.arange(seq_len)
        c0 = seq_len - q_len
        kept = (pos < min(sinks, c0)) | ((pos > c0 - max(window, 1)) & (pos < c0))  # the contract's window cache
        write_slots(wcache, torch.where(kept, wrow[pos // WBS] * WBS + pos % WBS, -1), k, v)
        write_slots(fcache, frow[pos // FBS] * FBS + pos % FBS, reduce_tokens(k.float(), proj.k_down),
                    reduce_tokens(v.float(), proj.v_down))
        ref = dar_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], proj,
                            window=window, sink_tokens=sinks, scale=SCALE)
        qs.append(q)
        ks.append(k[c0:])
        vs.append(v[c0:])
        refs.append(ref[0].transpose(0, 1))
        qsl.append(qsl[-1] + q_len)
    args = {"window_cache": wcache, "window_table": wtable, "far_cache": fcache, "far_table": ftable, "query_start_loc": qsl,
                "seq_lens": [s for s, _ in reqs], "proj": PagedProjections.from_layer(proj, H), "window": window,
                "sink_tokens": sinks, "scale": SCALE}
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), args, torch.cat(refs)


# (name, [(seq_len, q_len)], window, sinks, joint)
SCENARIOS = [
    ("small_decode", [(5, 1), (40, 1), (1, 1)], 8, 2, False),
    ("decode_batch_blocks", [(17, 1), (64, 1), (100, 1), (3, 1), (33, 1)], 16, 4, False),
    ("mixed", [(70, 70), (33, 1), (90, 17), (120, 1)], 16, 4, False),
    ("large_prefill_joint", [(300, 300)], 32, 4, True),
    ("extend_long_history", [(400, 90), (380, 1)], 24, 4, False),
    ("window_zero", [(30, 5), (20, 1), (3, 1)], 0, 3, False),
    ("window_zero_no_sinks", [(10, 1), (12, 6)], 0, 0, True),
    ("window_one", [(12, 1), (12, 5)], 1, 0, False),
    ("no_sinks", [(50, 50), (51, 1)], 8, 0, True),
    ("window_larger_than_history", [(20, 1), (30, 10), (5, 5)], 64, 4, False),
    ("chunk_starts_in_sinks", [(6, 4), (10, 9), (40, 38)], 2, 4, False),
]
IDS = [s[0] for s in SCENARIOS]


def cpp_ops() -> DarOps:
    assert cpp.load(), "the C++ ops did not build"
    return select_ops("cpp")


@pytest.fixture(params=["cpp", "reference"])
def ops(request) -> DarOps:
    """The C++ ops and the reference ops (the fallback where the C++ ops cannot be built)."""
    return cpp_ops() if request.param == "cpp" else select_ops("reference")


@pytest.fixture(params=["cpp", "cpp_small_items", "reference"])
def attend(request):
    """The C++ attention with its default work items and with one or two queries per work item (the split must
    not change results), and the reference attention."""
    if request.param == "reference":
        return select_ops("reference").attend
    fn = cpp_ops().attend
    return fn if request.param == "cpp" else functools.partial(fn, rows_per_item=4)


@pytest.mark.parametrize("dims", [SMALL, SMOL, RECIPE, HD128], ids=["small", "smol", "recipe", "hd128"])
@pytest.mark.parametrize("name,reqs,window,sinks,joint", SCENARIOS, ids=IDS)
def test_ops_match_reference_fp32(name, reqs, window, sinks, joint, dims, attend):
    query, key, value, args, ref = build_batch(reqs, window, sinks, joint, torch.float32, dims)
    out = torch.full_like(query, float("nan"))
    attend(query, key, value, out, **args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,reqs,window,sinks,joint", SCENARIOS[:4] + SCENARIOS[5:6], ids=IDS[:4] + IDS[5:6])
@pytest.mark.parametrize("dims", [SMALL, SMOL, RECIPE], ids=["small", "smol", "recipe"])
def test_ops_match_reference_bf16(name, reqs, window, sinks, joint, dims, ops):
    query, key, value, args, ref = build_batch(reqs, window, sinks, joint, torch.bfloat16, dims)
    out = torch.full_like(query, float("nan"))
    ops.attend(query, key, value, out, **args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


WIDE = (4, 2, 32, 32, 16)  # rk = 32: two 16-rank tiles of the kernel's far scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [WIDE, SMOL, RECIPE], ids=["wide", "smol", "recipe"])
@pytest.mark.parametrize("name,reqs,window,sinks,joint", [SCENARIOS[i] for i in (1, 2, 3, 4)],
                         ids=[IDS[i] for i in (1, 2, 3, 4)])
def test_kernel_far_blocks_of_partial_tiles(name, reqs, window, sinks, joint, dims, dtype, monkeypatch):
    """40-token far blocks: the kernel's 16-position score tiles end mid-block (16 + 16 + 8), at every
    visible-prefix length; with rk = 32 each tile sums two rank tiles."""
    monkeypatch.setattr(sys.modules[__name__], "FBS", 40)
    query, key, value, args, ref = build_batch(reqs, window, sinks, joint, dtype, dims)
    out = torch.full_like(query, float("nan"))
    cpp_ops().attend(query, key, value, out, **args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name,reqs,window,sinks,joint", SCENARIOS, ids=IDS)
def test_cpp_matches_reference_ops(name, reqs, window, sinks, joint):
    query, key, value, args, _ = build_batch(reqs, window, sinks, joint, torch.float32)
    fast, loop = torch.empty_like(query), torch.empty_like(query)
    cpp_ops().attend(query, key, value, fast, **args)
    paged.dar_paged_attention(query, key, value, loop, **args)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)


def test_strided_rows_like_vllm_qkv(ops):
    """vLLM hands attention views of one fused qkv projection (token stride (H + 2J) * D): same result."""
    query, key, value, args, ref = build_batch(SCENARIOS[2][1], 16, 4, False, torch.float32)
    t, h, d = query.shape
    qkv = torch.cat([query.flatten(1), key.flatten(1), value.flatten(1)], dim=1)  # [T, (H + 2J) * D]
    j = key.shape[1]
    q_v = qkv[:, : h * d].view(t, h, d)
    k_v = qkv[:, h * d: (h + j) * d].view(t, j, d)
    v_v = qkv[:, (h + j) * d:].view(t, j, d)
    out = torch.full_like(query, float("nan"))
    ops.attend(q_v, k_v, v_v, out, **args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_single_token_with_key_and_value_of_other_strides(ops):
    """A decode step of one request under ``vllm serve``: key [1, J, D] is a tensor of its own (after RoPE),
    value a view of the fused qkv output. Their token strides differ, and ``contiguous()`` keeps a size-1
    dimension's stride, so the launcher cannot equalise them: the one token must still be read right."""
    query, key, value, args, ref = build_batch([(40, 1)], 8, 2, False, torch.float32)
    t, h, d = query.shape
    j = key.shape[1]
    qkv = torch.cat([query.flatten(1), key.flatten(1), value.flatten(1)], dim=1)  # [1, (H + 2J) * D]
    v_v = qkv.as_strided((t, j, d), (qkv.stride(0), d, 1), (h + j) * d)  # the token stride vLLM's view keeps
    assert t == 1 and v_v.stride(0) != key.stride(0) and v_v.contiguous().stride(0) != key.stride(0)
    assert torch.equal(v_v, value)
    out = torch.full_like(query, float("nan"))
    ops.attend(query, key.clone(), v_v, out, **args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def padded(cache: torch.Tensor, extra: int) -> torch.Tensor:
    """The same cache as vLLM lays out a padded page: each block's elements followed by ``extra`` unused ones
    (per-layer ranks whose far page does not divide the window page), i.e. a strided view."""
    n = cache.shape[0]
    page = cache[0].numel()
    buf = torch.full((n, page + extra), float("nan"), dtype=cache.dtype)
    buf[:, :page] = cache.reshape(n, page)
    return buf[:, :page].view(cache.shape)


@pytest.mark.parametrize("joint", [False, True], ids=["per_head", "joint"])
def test_padded_pages(ops, joint):
    """Strided (padded-page) caches give the reference result; the kernel reads them in place, through the
    block stride (the NaN padding would show if it read across a block's end)."""
    query, key, value, args, ref = build_batch(SCENARIOS[2][1], 16, 4, joint, torch.float32)
    args = {**args, "far_cache": padded(args["far_cache"], 40), "window_cache": padded(args["window_cache"], 8)}
    assert not args["far_cache"].is_contiguous()
    assert cpp.dense_blocks(args["far_cache"]) and cpp.dense_blocks(args["window_cache"])
    out = torch.full_like(query, float("nan"))
    ops.attend(query, key, value, out, **args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_vector_path_is_built_for_this_cpu():
    """The op is built with -march=native: its vector paths (simd16.h) run on AVX-512 and on AVX2 + FMA + F16C
    CPUs; only others take the scalar loops (and cannot read FP8 caches). Fails if a build flag change drops
    them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the vector paths are x86 only")
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    expected = ("avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma", "f16c"} <= flags else "none")
    assert cpp_ops() is not None and cpp.simd() == expected


def test_dense_blocks():
    """Which cache views the kernel reads in place: dense or padded blocks yes, anything else no."""
    cache = torch.zeros(6, 3, 16, 32)
    assert cpp.dense_blocks(cache)
    assert cpp.dense_blocks(padded(cache, 5))
    assert not cpp.dense_blocks(cache.transpose(1, 2).contiguous().transpose(1, 2))  # [nb, B, heads, C]
    assert not cpp.dense_blocks(cache[:, :, :, :16])  # rows narrower than their stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("joint", [False, True], ids=["per_head", "joint"])
@pytest.mark.parametrize("pad", [0, 24], ids=["dense", "padded"])
def test_write_matches_pytorch(ops, dtype, joint, pad):
    """The cache write (C++ and reference ops) equals ``write_slots`` of the full-width and the reduced
    K/V: every slot it should store, bit for bit at full width, within fp32 rounding at reduced width (the
    kernel sums the projection in another order), and nothing else: slots in the null block 0 and -1 skipped."""
    H, J, D, RK, RV = SMALL
    proj = PagedProjections.from_layer(random_projections(joint, SMALL), H)
    t = 70
    torch.manual_seed(1)
    key, value = torch.randn(t, J, D).to(dtype), torch.randn(t, J, D).to(dtype)
    wslots = torch.randperm((NBLOCKS - 1) * WBS)[:t] + WBS
    fslots = torch.randperm((NBLOCKS - 1) * FBS)[:t] + FBS
    wslots[:5], wslots[5:9] = -1, torch.arange(4)  # not kept: padding, null block
    fslots[9:12] = torch.tensor([-1, 0, FBS - 1])
    caches = []
    for write in (ops.write, "reference"):
        wcache = padded(torch.full((NBLOCKS, J, WBS, 2 * D), float("nan"), dtype=dtype), pad)
        fcache = padded(torch.full((NBLOCKS, proj.k_down.shape[0], FBS, RK + RV), float("nan"), dtype=dtype), pad)
        if write == "reference":
            write_slots(wcache, wslots, key, value)
            write_slots(fcache, fslots, reduce_tokens(key, proj.k_down), reduce_tokens(value, proj.v_down))
        else:
            write(key, value, window_cache=wcache, window_slots=wslots.int(), far_cache=fcache, far_slots=fslots,
                  proj=proj)
        caches.append((wcache, fcache))
    (w, f), (w_ref, f_ref) = caches
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0, equal_nan=True)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(f.float(), f_ref.float(), equal_nan=True, **tol)
    assert f_ref[1:].isfinite().flatten(1).any(1).sum() > 0  # the check is not over NaN-only caches


def test_cpp_ops_refuse_what_they_would_misread():
    """The C++ ops check their arguments (TORCH_CHECK) before reading raw pointers, naming the argument."""
    cpp_ops()
    query, key, value, args, _ = build_batch(SCENARIOS[0][1], 8, 2, False, torch.float32)
    p = args["proj"]
    i32 = torch.int32  # vLLM's dtype for offsets and block tables
    raw = [query, key, value, torch.empty_like(query), torch.tensor(args["query_start_loc"], dtype=i32),
           torch.tensor(args["seq_lens"], dtype=i32), args["window_cache"], args["window_table"].to(i32),
           args["far_cache"], args["far_table"].to(i32), p.q_proj, p.v_up, 8, 2, SCALE, 48, 1.0, 1.0]
    torch.ops.vllm_dar.dar_attention(*raw)  # as built: accepted
    for i, bad, match in [(7, args["window_table"].long(), "int32"),
                          (8, args["far_cache"][..., :-1], "far_cache must be dense"),
                          (8, args["far_cache"][..., :-1].contiguous(), "far_cache's width"),
                          (11, p.v_up.double(), "v_up"), (1, key.bfloat16(), "query dtype")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.vllm_dar.dar_attention(*raw[:i], bad, *raw[i + 1:])
    w = args["window_cache"]
    with pytest.raises(RuntimeError, match="window_cache"):
        torch.ops.vllm_dar.dar_write(key, value, w[..., :-2], torch.zeros(len(key), dtype=torch.long),
                                     args["far_cache"], torch.zeros(len(key), dtype=torch.long), p.k_down, p.v_down,
                                     1.0, 1.0)
