"""Per-layer token budgets served by the real vLLM engine (CPU, fp32, ``VLLM_DAR_OPS`` as set: the C++ ops by
default): greedy tokens equal the Hugging Face reference that selects and evicts the same way
(``vllm_dar.reference.select_kept`` at the served far cache's block), with prompts that finish their prefill in
the same step and one too short to evict anything; and the far blocks a compacted prompt gives back let more
requests run at once than plain DAR in the same KV memory."""
from __future__ import annotations

import os
import shutil

import pytest

from vllm_dar.checkpoint import set_budget
from vllm_dar.config import BudgetConfig

from .helpers import run_engine
from .test_engine import hf_greedy, tokens

pytestmark = pytest.mark.slow


def with_budget(src: str, dst, budget: BudgetConfig | None) -> str:
    """A copy of ``src`` (weights hard-linked; ``set_budget`` replaces config.json, never the shared file)."""
    shutil.copytree(src, dst, copy_function=os.link)
    set_budget(str(dst), budget)
    return str(dst)


def max_overlap(intervals: list[list[float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def test_budget_greedy_matches_reference(dar_smol, doc_tokens, tmp_path):
    """Pyramid budgets averaging 25% of the candidates (window 64, 4 sinks, W 32, far blocks of 64 tokens): the
    600- and 1,900-token prompts evict (the top layer keeps 1-2% of 533 / 1,833 candidates), the 90-token one
    has too few candidates to free a block and keeps everything; all three prefill in one step."""
    model = with_budget(dar_smol, tmp_path / "model", BudgetConfig.make(0.25, 30))
    prompts = [doc_tokens[:600], doc_tokens[40:130], doc_tokens[:1900]]
    got = run_engine(tmp_path, model, [prompts], max_tokens=24,
                     engine={"max_model_len": 2048, "max_num_batched_tokens": 4096})
    assert tokens(got[0]) == hf_greedy(model, prompts)


def test_budget_frees_blocks_for_more_requests(dar_smol, tmp_path):
    """Eight 1,500-token requests in 150 KV blocks (both models group their 30 layers' window caches in one KV
    cache group and their far caches in another, so a block is 30 pages of 24 KiB either way: 105 MiB). Plain DAR
    holds about 36 blocks a request at admission (25 far blocks of 64 tokens, a sink block and two window
    tails) and runs four at once at most; with no candidate kept (window and sinks only: uniform budget 0, at
    most a far block of candidates per layer) a request keeps 3 far blocks after its prefill and all eight run at
    once. vLLM's logged capacity (admission counts the whole prompt) is the same for both."""
    budget = with_budget(dar_smol, tmp_path / "budget", BudgetConfig.make(0.0, 30, schedule="uniform"))
    prompts = [[1000 + 37 * i + j % 500 for j in range(1500)] for i in range(8)]
    engine = {"max_model_len": 1600, "num_gpu_blocks_override": 150, "disable_log_stats": False,
              "enable_prefix_caching": False}
    plain, cap_plain = run_engine(tmp_path, dar_smol, [prompts], max_tokens=48, engine=engine, capacity=True)
    kept, cap_kept = run_engine(tmp_path, budget, [prompts], max_tokens=48, engine=engine, capacity=True)
    assert cap_plain == cap_kept
    n_plain = max_overlap([r["interval"] for r in plain[0]])
    n_kept = max_overlap([r["interval"] for r in kept[0]])
    assert n_plain <= 4 and n_kept == 8, (n_plain, n_kept)
    assert sum(r["preemptions"] for r in kept[0]) == 0
