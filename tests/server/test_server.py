"""`vllm serve` on a DAR checkpoint, driven by the official ``openai`` client (real server, real model, fp32).

Completions must match the Hugging Face DAR reference token for token on a prompt longer than the window; chat
must answer, and streaming must concatenate to the non-streaming answer. A second server serves a copy with
per-layer token budgets: its completions must equal the reference that selects and evicts the same way.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from engine.helpers import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow
MAX_TOKENS = 16
PROMPT_TOKENS = 200  # > the window (64): the far cache is in play
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]


class Server:
    def __init__(self, model: str, port: int, log: Path):
        from openai import OpenAI

        self.model, self.log = model, log
        self.client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300)


def serving(model: str, log: Path, *args: str):
    """``vllm serve MODEL *args`` (output in ``log``) once it answers, stopped when the generator closes."""
    proc, port = start_server(model, log, *args)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=600, log=log)
        yield Server(model, port, log)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(dar_smol, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    yield from serving(dar_smol, log, "--max-model-len", "1024", "--gpu-memory-utilization", "0.5")


@pytest.fixture(scope="module")
def long_prompt(dar_smol) -> list[int]:
    """The first PROMPT_TOKENS tokens of a held-out documentation file."""
    from transformers import AutoTokenizer

    from vllm_dar.data import split_files

    with open(split_files()[1][0], encoding="utf-8") as f:
        ids = AutoTokenizer.from_pretrained(dar_smol)(f.read(), add_special_tokens=False)["input_ids"]
    assert len(ids) >= PROMPT_TOKENS
    return ids[:PROMPT_TOKENS]


def test_completion_matches_hf_reference(server, long_prompt):
    from vllm_dar.evaluate import greedy, load_for_eval

    # Token ids in and out: no tokenizer round trip on either side. ignore_eos: the reference never stops.
    out = server.client.completions.create(model=server.model, prompt=long_prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = out.choices[0]
    assert choice.text.strip()
    model, _, cfg, projections = load_for_eval(server.model, "float32")
    expected = greedy(model, long_prompt, MAX_TOKENS, cfg=cfg, projections=projections)
    assert choice.token_ids == expected


@pytest.fixture(scope="module")
def budget_server(dar_smol, tmp_path_factory):
    """``vllm serve`` on a copy of dar_smol with pyramid budgets of 25% of the candidates (weights hard-linked)."""
    from engine.test_budgets import with_budget

    from vllm_dar.config import BudgetConfig

    tmp = tmp_path_factory.mktemp("serve-budget")
    model = with_budget(dar_smol, tmp / "model", BudgetConfig.make(0.25, 30))
    yield from serving(model, tmp / "serve.log", "--max-model-len", "1024")


def test_budget_model_completion_matches_hf_reference(budget_server, doc_tokens):
    """A 600-token prompt (window 64, far blocks of 64 tokens: every layer evicts some of its 533 candidates),
    prefilled in one step as the plugin configures a budget model, which the server's log says."""
    from engine.test_engine import hf_greedy

    prompt = doc_tokens[:600]
    out = budget_server.client.completions.create(
        model=budget_server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    assert out.choices[0].token_ids == hf_greedy(budget_server.model, [prompt], MAX_TOKENS)[0]
    assert "has token budgets (dar.budget)" in budget_server.log.read_text()


def _chat(server, **kw):
    return server.client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=MAX_TOKENS,
                                                 temperature=0, **kw)


def test_chat_answers(server):
    answer = _chat(server).choices[0].message.content
    assert answer and answer.strip()


def test_chat_stream_equals_non_streaming(server):
    whole = _chat(server).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in _chat(server, stream=True) if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == whole
