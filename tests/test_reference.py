"""The reference DAR attention against a naive per-position loop, and its limiting cases."""
from __future__ import annotations

import math

import pytest
import torch

from vllm_dar.kv_dtype import round_trip
from vllm_dar.reference import LayerProjections, dar_attention, dar_attention_sdpa, dar_masks, reconstruct_kv


def naive_dar(q, k, v, proj, *, window, sink_tokens, scale, q_offset, kv_dtype=None, far_only=False):
    """One query, one head, one key at a time: the definition read literally. ``kv_dtype``: every stored key and
    value (full width unless ``far_only``, and reduced: reduced in fp32, then stored) read back from an FP8 cache
    of that dtype."""

    def stored(x, reduced=False):
        return round_trip(x.float(), kv_dtype if reduced or not far_only else None).double()

    b, h, tq, d = q.shape
    j = k.shape[1]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    g = proj.groups if proj is not None else j
    jg = j // g
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // j)
            grp = kv // jg
            for i in range(tq):
                t = q_offset + i
                scores, vals = [], []
                for s in range(t + 1):
                    if proj is None or t - s < window or s < sink_tokens:
                        scores.append(float(q[bi, hi, i].double() @ stored(k[bi, kv, s])) * scale)
                        vals.append(stored(v[bi, kv, s]))
                    else:
                        kg = k[bi, grp * jg:(grp + 1) * jg, s].reshape(-1).float()
                        vg = v[bi, grp * jg:(grp + 1) * jg, s].reshape(-1).float()
                        qr = q[bi, hi, i].double() @ proj.q_proj[kv].double()
                        kr = stored(kg @ proj.k_down[grp].float(), reduced=True)
                        scores.append(float(qr @ kr) * scale)
                        vals.append(stored(vg @ proj.v_down[grp].float(), reduced=True) @ proj.v_up[kv].double())
                m = max(scores)
                w = [math.exp(x - m) for x in scores]
                z = sum(w)
                out[bi, hi, i] = sum(wi / z * vi for wi, vi in zip(w, vals))
    return out


def random_proj(j, d, rk, rv, *, joint=False, seed=0):
    g = 1 if joint else j
    dg = d * j // g
    gen = torch.Generator().manual_seed(seed)
    return LayerProjections(q_proj=torch.randn(j, d, rk, generator=gen) / d ** 0.5,
                            k_down=torch.randn(g, dg, rk, generator=gen) / dg ** 0.5,
                            v_down=torch.randn(g, dg, rv, generator=gen) / dg ** 0.5,
                            v_up=torch.randn(j, rv, d, generator=gen) / rv ** 0.5)


def qkv(b, h, j, t, d, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=gen).to(dtype), torch.randn(b, j, t, d, generator=gen).to(dtype),
            torch.randn(b, j, t, d, generator=gen).to(dtype))


CASES = [  # (heads, kv_heads, window, sinks, rk, rv, joint)
    (4, 4, 3, 0, 4, 4, False),   # MHA
    (6, 2, 5, 2, 3, 6, False),   # GQA 3, thin keys
    (6, 2, 0, 0, 4, 4, False),   # uniform: every position reduced
    (6, 2, 0, 3, 4, 4, False),   # uniform with sinks
    (8, 1, 4, 1, 2, 5, False),   # MQA (GQA 8)
    (6, 3, 4, 1, 8, 6, True),    # joint projection across KV heads
]


@pytest.mark.parametrize("h,j,w,sinks,rk,rv,joint", CASES)
def test_matches_naive_loop(h, j, w, sinks, rk, rv, joint):
    d, t = 8, 13
    q, k, v = qkv(2, h, j, t, d)
    proj = random_proj(j, d, rk, rv, joint=joint)
    for tq in (t, 4, 1):  # prefill, a chunk, a decode step
        got = dar_attention(q[:, :, t - tq:], k, v, proj, window=w, sink_tokens=sinks, scale=0.3)
        want = naive_dar(q[:, :, t - tq:], k, v, proj, window=w, sink_tokens=sinks, scale=0.3, q_offset=t - tq)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h,j,w,sinks,rk,rv,joint", CASES)
def test_sdpa_path_matches_reference(h, j, w, sinks, rk, rv, joint):
    d, t = 8, 40
    q, k, v = qkv(1, h, j, t, d)
    proj = random_proj(j, d, rk, rv, joint=joint)
    for tq in (t, 7, 1):
        want = dar_attention(q[:, :, t - tq:], k, v, proj, window=w, sink_tokens=sinks)
        got = dar_attention_sdpa(q[:, :, t - tq:], k, v, proj, window=w, sink_tokens=sinks)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("h,j,w,sinks,rk,rv,joint", [CASES[i] for i in (1, 3, 5)])
def test_sdpa_fp8_cache_matches_the_definition(h, j, w, sinks, rk, rv, joint, kv_dtype):
    """The FP8 KV cache simulation of the quality benchmark (``kv_dtype``): every full-width K/V and every reduced
    K/V read back as the FP8 cache stores it, or the reduced ones only (``far_only``); also without projections
    (stock attention over an FP8 cache)."""
    d, t = 8, 24
    q, k, v = qkv(1, h, j, t, d)
    proj = random_proj(j, d, rk, rv, joint=joint)
    for tq in (t, 1):
        for p, window, far_only in ((proj, w, False), (proj, w, True), (None, 0, False)):
            got = dar_attention_sdpa(q[:, :, t - tq:], k, v, p, window=window, sink_tokens=sinks, scale=0.3,
                                     kv_dtype=kv_dtype, far_only=far_only)
            want = naive_dar(q[:, :, t - tq:], k, v, p, window=window, sink_tokens=sinks, scale=0.3,
                             q_offset=t - tq, kv_dtype=kv_dtype, far_only=far_only)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
            plain = dar_attention_sdpa(q[:, :, t - tq:], k, v, p, window=window, sink_tokens=sinks, scale=0.3)
            assert (got - plain).abs().max() > 1e-3  # the simulation really quantized


def test_window_covering_sequence_is_standard_attention():
    q, k, v = qkv(2, 6, 2, 33, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    got = dar_attention(q, k, v, random_proj(2, 16, 2, 2), window=33)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dar_attention(q, k, v, None, window=0), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("joint", [False, True])
def test_full_rank_projections_are_standard_attention(joint):
    q, k, v = qkv(1, 6, 2, 29, 16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    got = dar_attention(q, k, v, LayerProjections.identity(2, 16, joint=joint), window=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reduction_changes_the_output():
    """Guards against a reference that silently ignores the projections."""
    q, k, v = qkv(1, 4, 2, 50, 16)
    full = dar_attention(q, k, v, None, window=0)
    red = dar_attention(q, k, v, random_proj(2, 16, 2, 2), window=8)
    assert (full[:, :, 8:] - red[:, :, 8:]).abs().max() > 1e-2
    torch.testing.assert_close(red[:, :, :8], full[:, :, :8])  # inside the window nothing is reduced


def test_bf16_close_to_fp32():
    # bf16 inputs: the reference computes in fp32, so the only error is bf16 rounding of inputs and output.
    q, k, v = qkv(1, 6, 2, 64, 32)
    proj = random_proj(2, 32, 8, 8)
    want = dar_attention(q, k, v, proj, window=16, sink_tokens=2)
    got = dar_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), proj, window=16, sink_tokens=2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_masks_partition_the_causal_triangle():
    full, red = dar_masks(10, 10, window=3, sink_tokens=2, q_offset=0)
    assert not (full & red).any()
    assert torch.equal(full | red, torch.ones(10, 10).tril().bool())
    assert full[9, 0] and full[9, 1] and not full[9, 2] and full[9, 7] and red[9, 6]


def test_lse_and_explicit_positions():
    q, k, v = qkv(1, 4, 2, 20, 8)
    proj = random_proj(2, 8, 3, 3)
    pos = torch.tensor([3, 11, 19])
    out, lse = dar_attention(q[:, :, pos], k, v, proj, window=4, q_offset=pos, return_lse=True)
    for n, p in enumerate(pos.tolist()):
        want = dar_attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], proj, window=4)
        torch.testing.assert_close(out[:, :, n:n + 1], want)
    assert lse.shape == (1, 4, 3) and torch.isfinite(lse).all()


def test_reconstructed_kv_reproduce_reduced_scores():
    q, k, v = qkv(1, 4, 2, 10, 8)
    proj = random_proj(2, 8, 3, 5, joint=True)
    k_rec, _ = reconstruct_kv(k, v, proj)
    from vllm_dar.reference import reduce_kv, reduce_queries

    want = reduce_queries(q, proj.q_proj) @ reduce_kv(k, proj.k_down).repeat_interleave(4, 1).mT
    got = q @ k_rec.repeat_interleave(2, 1).mT
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


BLOCK_CASES = CASES + [
    (6, 2, 9, 2, 3, 6, False),   # window between the block sizes
    (6, 2, 40, 0, 3, 6, False),  # window = sequence: nothing reduced
    (6, 2, 50, 2, 3, 6, False),  # window longer than the sequence
    (6, 2, 5, 9, 3, 6, False),   # more sinks than a block of 7 holds
    (6, 2, 0, 30, 3, 6, False),  # uniform, sinks past the 23-query run's first query (position 17)
]


@pytest.mark.parametrize("h,j,w,sinks,rk,rv,joint", BLOCK_CASES)
def test_sdpa_query_blocks_match_one_call(h, j, w, sinks, rk, rv, joint):
    """Blocked queries (each block reading only the keys it can see) equal one call over every key, in value
    and in the gradients the healing fine-tune takes, for blocks of 1, smaller and larger than the window."""
    d, t = 8, 40
    q, k, v = qkv(2, h, j, t, d)
    proj = random_proj(j, d, rk, rv, joint=joint)
    for tq in (t, 23, 1):
        grads = []
        for chunk in (t, 1, 7, 16):
            qq, kk, vv = (x.clone().requires_grad_(True) for x in (q[:, :, t - tq:], k, v))
            pp = LayerProjections(*(x.clone().requires_grad_(True) for x in (proj.q_proj, proj.k_down, proj.v_down,
                                                                             proj.v_up)))
            out = dar_attention_sdpa(qq, kk, vv, pp, window=w, sink_tokens=sinks, chunk=chunk)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            grads.append([out.detach()] + [x.grad for x in (qq, kk, vv, pp.q_proj, pp.k_down, pp.v_down, pp.v_up)])
        want = dar_attention(q[:, :, t - tq:], k, v, proj, window=w, sink_tokens=sinks)
        torch.testing.assert_close(grads[0][0], want, atol=2e-5, rtol=2e-5)
        for other in grads[1:]:
            for got, ref in zip(other, grads[0]):
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
