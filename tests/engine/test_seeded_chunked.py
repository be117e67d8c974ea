"""A seeded request whose prompt is prefilled in several chunks, through the real engine on CPU
(``vllm_dar.patches.cpu_seeded_partial_prefill``): stock vLLM 0.32's CPU runner dies on it ("CPU Generator does not
use offset"), for any model; with the plugin it completes and samples exactly what the same request samples
unchunked (a DAR model here: its prefill chunks also cross the window)."""
from __future__ import annotations

import pytest

from .helpers import run_engine
from .test_engine import hf_greedy

pytestmark = pytest.mark.slow
SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 7}


def test_seeded_sampling_is_the_same_chunked_and_whole(dar_smol, doc_tokens, tmp_path):
    prompts = [doc_tokens[:300], doc_tokens[400:480]]  # 300 tokens: 5 chunks of 64 (and one request unchunked)
    chunked = run_engine(tmp_path, dar_smol, [prompts], max_tokens=12, sampling=SAMPLING,
                         engine={"max_num_batched_tokens": 64, "max_num_seqs": 2})
    whole = run_engine(tmp_path, dar_smol, [prompts], max_tokens=12, sampling=SAMPLING)
    assert [r["tokens"] for r in chunked[0]] == [r["tokens"] for r in whole[0]]
    assert chunked[0][0]["tokens"] != hf_greedy(dar_smol, prompts[:1], 12)[0]  # the seed really sampled
