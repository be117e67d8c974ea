"""`vllm-dar compare`: the stock model and its DAR conversion served side by side by real vLLM engines."""
from __future__ import annotations

import math

import pytest

from vllm_dar.compare import CompareSettings, compare, render

pytestmark = pytest.mark.slow

# Short runs: the fields, not the figures (scripts/main.sh runs the defaults).
SMALL = CompareSettings(context=256, eval_windows=1, batch=2, prompt_tokens=128, decode_tokens=4, answer_tokens=8)


def test_compare_serves_both_and_reports_every_field(default_model, dar_smol, tmp_path):
    r = compare(default_model, dar_smol, settings=SMALL, log_dir=str(tmp_path), progress=False)
    stock, dar = r["stock"], r["dar"]
    assert r["kv_capacity_ratio"] > 1 and stock["kv_capacity_tokens"] > 0
    assert r["kv_capacity_ratio"] == dar["kv_capacity_tokens"] / stock["kv_capacity_tokens"]
    for x in (stock, dar):
        assert x["answer"].strip() and x["prompt_tokens"] > 64  # the passage reaches past the 64-token window
        assert math.isfinite(x["perplexity"]) and x["perplexity"] > 1 and x["tokens"] == 255
        assert x["decode_tok_s"] > 0 and x["served_dtype"] == "torch.bfloat16"
        assert x["max_model_len"] == stock["max_model_len"] >= x["prompt_tokens"] + SMALL.answer_tokens
    assert math.isfinite(r["perplexity_delta"]) and r["decode_speedup"] > 0 and 0 < r["dar_kv_fraction"] < 1
    screen = render(r)
    assert "KV cache capacity" in screen and "perplexity" in screen and len(screen.splitlines()) < 25


def test_compare_refuses_swapped_directories(default_model, dar_smol):
    with pytest.raises(ValueError, match="STOCK_DIR"):
        compare(dar_smol, default_model)
    with pytest.raises(ValueError, match="DAR_DIR"):
        compare(default_model, default_model)
