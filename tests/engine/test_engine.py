"""The DAR backend inside a real vLLM engine (CPU), against the Hugging Face reference engine, in fp32.

Every engine runs in its own process (``helpers.run_engine``). Greedy decoding must match token for token:
both sides compute attention in fp32, so only summation order differs.
"""
from __future__ import annotations

import pytest

from .helpers import EngineFailed, engine_result, run_engine

pytestmark = pytest.mark.slow
MAX_TOKENS = 24
WINDOW = 64


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm_dar.evaluate import greedy, load_for_eval

    model, _, cfg, projections = load_for_eval(model_dir, "float32")
    return [greedy(model, p, max_tokens, cfg=cfg, projections=projections) for p in prompts]


def tokens(run: list[dict]) -> list[list[int]]:
    return [r["tokens"] for r in run]


def mixed_prompts(doc: list[int]) -> list[list[int]]:
    """Shorter than, equal to, and several (128-token) window-cache blocks longer than the window."""
    return [doc[:20], doc[100:100 + WINDOW], doc[300:300 + 5 * 128 + 17]]


def test_stock_model_unchanged_by_plugin(default_model, doc_tokens, tmp_path):
    """Same tokens and the same logged KV capacity with and without the plugin (fixed KV memory), in vLLM's
    default processes (the plugin loads in each)."""
    prompts = [doc_tokens[:20], doc_tokens[50:400]]
    with_plugin, cap_with = run_engine(tmp_path, default_model, [prompts], max_tokens=16, capacity=True,
                                       processes=True)
    without, cap_without = run_engine(tmp_path, default_model, [prompts], max_tokens=16, plugins=False,
                                      capacity=True, processes=True)
    assert tokens(with_plugin[0]) == tokens(without[0])
    assert cap_with == cap_without > 0


def test_dar_matches_reference_mixed_batch(dar_smol, doc_tokens, tmp_path):
    """Small prefill chunks (64 tokens a step): the long prompt's chunks share steps with the others' decodes."""
    prompts = mixed_prompts(doc_tokens)
    got = run_engine(tmp_path, dar_smol, [prompts], max_tokens=MAX_TOKENS,
                     engine={"max_num_batched_tokens": 64, "max_num_seqs": 4})
    assert tokens(got[0]) == hf_greedy(dar_smol, prompts)


def test_chunked_prefill_and_prefix_cache(dar_smol, doc_tokens, tmp_path):
    """A 900-token prompt: one 1024-token chunk, then again (prefix-cache hit: the sink block must come back
    with the window blocks); and in 128-token chunks on another engine. All three equal the reference."""
    long = doc_tokens[:900]
    whole = run_engine(tmp_path, dar_smol, [[long], [long]], max_tokens=MAX_TOKENS,
                       engine={"max_num_batched_tokens": 1024})
    chunked = run_engine(tmp_path, dar_smol, [[long]], max_tokens=MAX_TOKENS,
                         engine={"max_num_batched_tokens": 128})
    first, repeat = whole[0][0], whole[1][0]
    assert repeat["cached"] > 0, "the repeated prompt did not hit the prefix cache"
    assert first["tokens"] == repeat["tokens"] == chunked[0][0]["tokens"]
    assert first["tokens"] == hf_greedy(dar_smol, [long])[0]


def test_per_layer_windows_and_joint_sharing(dar_smol_pyramid, doc_tokens, tmp_path):
    """Pyramid schedule (windows and ranks differ per layer: several window and far cache groups), joint
    projections (one group per layer)."""
    prompts = mixed_prompts(doc_tokens)
    got = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=MAX_TOKENS,
                     engine={"max_num_batched_tokens": 64, "max_num_seqs": 4})
    assert tokens(got[0]) == hf_greedy(dar_smol_pyramid, prompts)


def test_fp8_kv_cache(dar_smol_pyramid, doc_tokens, tmp_path):
    """``kv_cache_dtype="fp8"`` (vllm_dar.kv_dtype.cache_dtypes): the far cache one byte per element beside a
    window cache in the model dtype, and with ``VLLM_DAR_FP8_WINDOW=1`` both caches, so an fp32 engine's KV
    capacity grows as the page model says (at this test's 1024 tokens the window's reservation is most of a
    request's pages: 1.28x), and 4x; and the served engine scores text as the FP8 simulation that the
    README's FP8 quality rows come from (``vllm_dar.reference.dar_attention_sdpa(kv_dtype=, far_only=)``: the
    reduced K/V, and with the window flag the full-width ones too, rounded to FP8), across windows, joint groups
    and ranks that are not whole 16-wide tiles (24), in 64-token prefill chunks.

    Perplexity, not greedy tokens, and within 1%: rounding to FP8 is discontinuous, so a difference of 1e-6 in
    one layer's output (summation order) moves an element of the next layer's K/V one FP8 step now and then, and
    that spreads through the layers; served FP8 perplexity scatters around the simulation by a few tenths of a
    percent, as much as FP8's own effect (README, FP8 KV caches). So this test checks the plumbing (FP8 caches
    allocated in each layout, the capacity that follows, served FP8 really differs from the unquantized engine,
    and stays near the simulation of its own layout); that the ops round exactly what the simulation rounds, the
    chunk's own K/V included, is checked without that noise in tests/ops/test_fp8_ops.py (same caches, op
    against op, and chunked against whole)."""
    from vllm_dar.config import RESERVED_TAILS, far_block_sizes, window_cache_blocks
    from vllm_dar.evaluate import load_for_eval, perplexity
    from vllm_dar.kv_dtype import KV_CACHE_DTYPES

    windows = [doc_tokens[i:i + 512] for i in (0, 600)]
    chunks = {"max_num_batched_tokens": 64, "max_num_seqs": 4}
    fp8 = {"far": engine_result(tmp_path, dar_smol_pyramid, [], max_tokens=1, score=windows,
                                engine={**chunks, "kv_cache_dtype": "fp8"}),
           "both": engine_result(tmp_path, dar_smol_pyramid, [], max_tokens=1, score=windows,
                                 engine={**chunks, "kv_cache_dtype": "fp8"}, env={"VLLM_DAR_FP8_WINDOW": "1"})}
    auto = engine_result(tmp_path, dar_smol_pyramid, [], max_tokens=1, engine=chunks, score=windows)
    capacity = {k: r["kv_capacity_tokens"] / auto["kv_capacity_tokens"] for k, r in fp8.items()}
    model, _, cfg, projections = load_for_eval(dar_smol_pyramid, "float32")
    assert capacity["both"] == pytest.approx(4, rel=1e-3), capacity
    # Far cache only: every page holds a window page's bytes, the window's at 4 bytes per element; vLLM counts a
    # 1024-token request's pages (window: sinks, two tails and the replay tail; far: whole pages).
    pages = {far: sum(min(window_cache_blocks(lay.window, lay.sink_tokens, 16, RESERVED_TAILS + 1), 1024 // 16 + 1)
                      + -(-1024 // far_block_sizes(16, lay.slot_elems * 4, [lay.reduced_elems() * far])[0])
                      for lay in map(cfg.layer, range(cfg.shape.num_layers))) for far in (4, 1)}
    assert capacity["far"] == pytest.approx(pages[4] / pages[1], rel=1e-3), (capacity, pages)  # 1.28 here

    def simulated(kv, far_only=False):
        return perplexity(model, windows, cfg=cfg, projections=projections, kv_dtype=kv,
                          far_only=far_only)["perplexity"]

    sim = {"far": simulated(KV_CACHE_DTYPES["fp8"], far_only=True), "both": simulated(KV_CACHE_DTYPES["fp8"]),
           "auto": simulated(None)}
    served = {"auto": auto["score"]["perplexity"], **{k: r["score"]["perplexity"] for k, r in fp8.items()}}
    assert served["auto"] == pytest.approx(sim["auto"], rel=1e-3), (served, sim)
    for layout in fp8:
        assert served[layout] == pytest.approx(sim[layout], rel=1e-2), (layout, served, sim)
        # FP8 really served: not the unquantized engine's score (an engine that fell back to full precision would
        # match it to ~1e-7, as served and simulated auto do).
        assert abs(served[layout] / served["auto"] - 1) > 1e-5, (layout, served)


def test_other_quantized_kv_caches_refused(dar_smol, tmp_path):
    refusal = "kv_cache_dtype='int8_per_token_head': the DAR backend stores K/V in the model dtype or in FP8"
    with pytest.raises(EngineFailed, match=refusal):
        run_engine(tmp_path, dar_smol, [[[1, 2, 3]]], max_tokens=1, engine={"kv_cache_dtype": "int8_per_token_head"})
