"""FP8 caches (``--kv-cache-dtype fp8*``, ``vllm_dar.kv_dtype``): the C++ ops against the reference ops on the
same FP8 caches, and both against the dense reference within FP8's rounding; both layouts served: the far cache in
FP8 beside a window cache in the activations' dtype (``far``, the default), and both caches in FP8 (``both``,
``VLLM_DAR_FP8_WINDOW=1``).

The batches are test_cpp_ops' (shuffled blocks, NaN wherever the contract says a slot is never read), with the
caches quantized as the cache write stores them (keys with ``k_scale``, values with ``v_scale``); NaN stays NaN.
Tolerances: C++ vs reference ops on the same caches, fp32 activations 1e-5 (summation order only), bf16 2e-2 (the
output's bf16 rounding); vs the dense reference on unquantized K/V, the error's norm relative to the output's:
0.06 for e4m3 and 0.12 for e5m2 (round to nearest leaves a relative error of one mantissa step / sqrt(12) in
RMS per stored element, 3.6% and 7.2%; measured 3.8-4.1% and 8.2-8.7% on these batches).
"""
from __future__ import annotations

import pytest
import torch

from vllm_dar.kv_dtype import dequantize, quantize
from vllm_dar.ops import paged, select_ops
from vllm_dar.ops.paged import PagedProjections, reduce_tokens, write_slots

from .test_cpp_ops import FBS, NBLOCKS, RECIPE, SCENARIOS, SMALL, SMOL, WBS, build_batch, cpp_ops, random_projections

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
DENSE_TOL = {"e4m3": 0.06, "e5m2": 0.12}
SCALES = (0.5, 2.0)  # k_scale, v_scale: not 1, so a scale applied to the wrong half shows


def to_fp8(cache: torch.Tensor, key_width: int, dtype: torch.dtype, k_scale: float, v_scale: float) -> torch.Tensor:
    """A model-dtype cache [blocks, heads, block_size, kw + vw] as an FP8 cache stores it."""
    out = torch.empty(cache.shape, dtype=dtype)
    out[..., :key_width] = quantize(cache[..., :key_width], dtype, k_scale)
    out[..., key_width:] = quantize(cache[..., key_width:], dtype, v_scale)
    return out


LAYOUTS = ("far", "both")  # which caches are FP8 (vllm_dar.kv_dtype.cache_dtypes)


def fp8_batch(reqs, window, sinks, joint, act_dtype, fp8, dims, layout="both"):
    # Caches built from K/V in the activation dtype: the chunk's own K/V must be what the window cache rounds.
    query, key, value, args, ref = build_batch(reqs, window, sinks, joint, act_dtype, dims)
    rk = args["proj"].q_proj.shape[-1]
    if layout == "both":
        args["window_cache"] = to_fp8(args["window_cache"], dims[2], fp8, *SCALES)
    args["far_cache"] = to_fp8(args["far_cache"], rk, fp8, *SCALES)
    args["k_scale"], args["v_scale"] = SCALES
    return query, key, value, args, ref


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dims", [SMOL, RECIPE], ids=["smol", "recipe"])
@pytest.mark.parametrize("name,reqs,window,sinks,joint", [SCENARIOS[i] for i in (1, 2, 3, 4, 5)],
                         ids=[SCENARIOS[i][0] for i in (1, 2, 3, 4, 5)])
def test_cpp_matches_reference_ops_on_fp8_caches(name, reqs, window, sinks, joint, dims, act, fmt, layout):
    query, key, value, args, ref = fp8_batch(reqs, window, sinks, joint, act, FP8[fmt], dims, layout)
    fast, loop = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    cpp_ops().attend(query, key, value, fast, **args)
    paged.dar_paged_attention(query, key, value, loop, **args)
    tol = 1e-5 if act == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), loop.float(), rtol=tol, atol=tol)
    # And the semantics: the dense reference on unquantized K/V, within FP8's rounding.
    error = float((fast.float() - ref).norm() / ref.norm())
    assert 0 < error < DENSE_TOL[fmt]  # > 0: the caches really were quantized


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("which", ["cpp", "reference"])
def test_fp8_outputs_do_not_depend_on_chunking(which, fmt, layout):
    """A 100-token prompt attended as one chunk or as its last 60 queries after the first 40 gives the same
    outputs: the chunk's own K/V are read as the FP8 cache rounds them, like the history's, so chunked prefill and
    decode see what one prefill sees."""
    ops = cpp_ops() if which == "cpp" else select_ops("reference")
    query, key, value, args, _ = fp8_batch([(100, 100)], 16, 4, False, torch.float32, FP8[fmt], SMOL, layout)
    tail_args = {**args, **fp8_batch([(100, 60)], 16, 4, False, torch.float32, FP8[fmt], SMOL, layout)[3]}
    whole, tail = torch.full_like(query, float("nan")), torch.full_like(query[40:], float("nan"))
    ops.attend(query, key, value, whole, **args)
    ops.attend(query[40:], key[40:], value[40:], tail, **tail_args)
    torch.testing.assert_close(tail, whole[40:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("joint", [False, True], ids=["per_head", "joint"])
def test_write_quantizes_like_the_contract(fmt, act, joint, layout):
    """The C++ write stores what ``vllm_dar.kv_dtype.quantize`` gives: at full width bit for bit (an FP8 window
    cache) or the activations themselves (a window cache in their dtype); at reduced width (another summation
    order before rounding) all but rare ties equal, none more than one FP8 step apart; values past the format's
    range saturate instead of becoming NaN or infinity."""
    H, J, D, RK, RV = SMALL
    dtype = FP8[fmt]
    proj = PagedProjections.from_layer(random_projections(joint, SMALL), H)
    t = 70
    torch.manual_seed(2)
    key, value = (torch.randn(t, J, D) * 3).to(act), (torch.randn(t, J, D) * 3).to(act)
    key[0, 0, 0], value[1, 0, 0] = 1e6, -1e6  # saturate
    wslots = torch.randperm((NBLOCKS - 1) * WBS)[:t] + WBS
    fslots = torch.randperm((NBLOCKS - 1) * FBS)[:t] + FBS
    wslots[5:9] = -1
    caches = []
    for who in ("cpp", "reference"):
        wcache = torch.full((NBLOCKS, J, WBS, 2 * D), float("nan")).to(dtype if layout == "both" else act)
        fcache = torch.full((NBLOCKS, proj.k_down.shape[0], FBS, RK + RV), float("nan")).to(dtype)
        if who == "reference":
            write_slots(wcache, wslots, key, value, *SCALES)
            write_slots(fcache, fslots, reduce_tokens(key, proj.k_down), reduce_tokens(value, proj.v_down), *SCALES)
        else:
            cpp_ops().write(key, value, window_cache=wcache, window_slots=wslots, far_cache=fcache,
                            far_slots=fslots, proj=proj, k_scale=SCALES[0], v_scale=SCALES[1])
        caches.append((wcache, fcache))
    (w, f), (w_ref, f_ref) = caches
    assert torch.equal(w.view(torch.uint8), w_ref.view(torch.uint8))
    top = torch.finfo(dtype).max
    if layout == "both":
        assert dequantize(w).nan_to_num(0).abs().max() == top  # saturated, stored finite
    else:
        assert dequantize(w).nan_to_num(0).abs().max() == key[0, 0, 0].float()  # stored as it is
    assert dequantize(f).nan_to_num(0).abs().max() <= top
    written = f_ref.float().isfinite()
    same = (f.view(torch.uint8) == f_ref.view(torch.uint8)) | ~written
    assert same.float().mean() > 0.99
    step = 2.0 ** -(3 if fmt == "e4m3" else 2)  # one step of the mantissa, relative
    fa, fb = f.float()[written], f_ref.float()[written]
    assert ((fa - fb).abs() <= step * fb.abs() + 1e-6).all()


def test_fp8_caches_refused_where_they_would_be_misread():
    """Pairs of cache dtypes that are not served (an FP8 window beside a far cache of the other FP8 format or of
    the activations' dtype) are refused by name, and so is an FP8 window cache with a head_dim the kernel's vector
    path cannot read (not a multiple of 16); an FP8 far cache alone is read at any head_dim (== reference ops)."""
    cpp_ops()
    query, key, value, args, _ = fp8_batch(SCENARIOS[0][1], 8, 2, False, torch.float32, FP8["e4m3"], SMOL)
    refusal = "the caches must be both in the activations' dtype"
    args["far_cache"] = args["far_cache"].view(torch.float8_e5m2)
    with pytest.raises(RuntimeError, match=refusal):
        select_ops("cpp").attend(query, key, value, torch.empty_like(query), **args)
    args["far_cache"] = args["far_cache"].to(torch.float32)
    with pytest.raises(RuntimeError, match=refusal):
        select_ops("cpp").attend(query, key, value, torch.empty_like(query), **args)
    odd = (6, 3, 24, 5, 7)
    query, key, value, args, _ = fp8_batch(SCENARIOS[0][1], 8, 2, False, torch.float32, FP8["e4m3"], odd)
    with pytest.raises(RuntimeError, match="an FP8 window cache needs AVX-512 or AVX2 and head_dim a multiple of 16"):
        select_ops("cpp").attend(query, key, value, torch.empty_like(query), **args)
    query, key, value, args, _ = fp8_batch(SCENARIOS[0][1], 8, 2, False, torch.float32, FP8["e4m3"], odd, "far")
    fast, loop = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    select_ops("cpp").attend(query, key, value, fast, **args)
    paged.dar_paged_attention(query, key, value, loop, **args)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)
