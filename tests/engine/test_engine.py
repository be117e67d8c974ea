"""The DAR backend inside a real vLLM engine (CPU), against the Hugging Face reference engine, in fp32.

Every engine runs in its own process (``helpers.run_engine``). Greedy decoding must match token for token:
both sides compute attention in fp32, so only summation order differs.
"""
from __future__ import annotations

import pytest

from .helpers import EngineFailed, run_engine

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
    """Same tokens and the same logged KV capacity with and without the plugin (fixed KV memory)."""
    prompts = [doc_tokens[:20], doc_tokens[50:400]]
    with_plugin, cap_with = run_engine(tmp_path, default_model, [prompts], max_tokens=16, capacity=True)
    without, cap_without = run_engine(tmp_path, default_model, [prompts], max_tokens=16, plugins=False,
                                      capacity=True)
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
    """``kv_cache_dtype="fp8"`` (vllm_dar.kv_dtype): both caches one byte per element, so an fp32 engine's KV
    capacity is 4x; the C++ ops follow the reference ops across windows, joint groups and ranks that are not whole
    16-wide tiles (24); and the first tokens follow the unquantized engine's.

    The two ops reduce K/V in different summation orders before rounding to FP8, so a reduced coordinate can land
    one FP8 step apart (tests/ops/test_fp8_ops.py) and a near tie can flip a later greedy token: the ops must
    agree on at least the first 12 tokens of every prompt, with log-probabilities within 0.1 there (0.053 seen)."""
    prompts = mixed_prompts(doc_tokens)
    fp8 = {"kv_cache_dtype": "fp8", "max_num_batched_tokens": 64, "max_num_seqs": 4}
    got, cap_fp8 = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=MAX_TOKENS, engine=fp8,
                              capacity=True, logprobs=True)
    ref = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=MAX_TOKENS, engine=fp8, logprobs=True,
                     env={"VLLM_DAR_OPS": "reference"})
    for a, b in zip(got[0], ref[0]):
        same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), MAX_TOKENS)
        assert same >= 12, (a["tokens"], b["tokens"])
        assert max(abs(x - y) for x, y in zip(a["logprobs"][:same], b["logprobs"][:same])) < 0.1
    full, cap_auto = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=MAX_TOKENS, capacity=True)
    assert 3.9 < cap_fp8 / cap_auto < 4.1, (cap_fp8, cap_auto)
    assert [t[:4] for t in tokens(got[0])] == [t[:4] for t in tokens(full[0])]


def test_other_quantized_kv_caches_refused(dar_smol, tmp_path):
    refusal = "kv_cache_dtype='int8_per_token_head': the DAR backend stores K/V in the model dtype or in FP8"
    with pytest.raises(EngineFailed, match=refusal):
        run_engine(tmp_path, dar_smol, [[[1, 2, 3]]], max_tokens=1, engine={"kv_cache_dtype": "int8_per_token_head"})
