"""DAR models under tensor parallelism on vLLM's CPU engine: the same greedy tokens as one rank, and each rank
holding only its share of the caches (vLLM's logged capacity: tokens in one rank's KV memory, the same memory
per rank, so it grows by what a rank saves).

vLLM's CPU workers run one process per rank (the "mp" executor) and all-reduce through shared memory. SmolLM2-135M
has 9 query heads and 3 KV heads, so its tensor-parallel size is 3 (vLLM refuses 2); the tiny random Llama (4
heads, 2 KV heads) runs at 2. fp32 throughout: only summation order differs between the layouts.
"""
from __future__ import annotations

import pytest

from vllm_dar.vllm_engine import cpu_thread_binding

from .helpers import engine_result

pytestmark = pytest.mark.slow
MAX_TOKENS = 24


def served(tmp_path, model: str, prompts: list[list[int]], tp: int) -> dict:
    engine = {"tensor_parallel_size": tp, "max_num_batched_tokens": 256}
    return engine_result(tmp_path, model, [prompts], max_tokens=MAX_TOKENS, engine=engine, logprobs=True,
                         env=cpu_thread_binding(tp))


def assert_same_model(one: dict, many: dict) -> None:
    """Token for token, and every generated token's log-probability within 1e-3."""
    assert [r["tokens"] for r in many["runs"][0]] == [r["tokens"] for r in one["runs"][0]]
    for a, b in zip(one["runs"][0], many["runs"][0]):
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


def test_joint_model_at_tp3_equals_tp1(dar_smol_pyramid, doc_tokens, tmp_path):
    """The recipe's layout (one joint projection per layer, per-layer windows 32/64/96 and ranks) split over 3
    ranks: each rank's reduced K/V are partial sums, all-reduced; its far cache holds the whole group. Prompts
    shorter than the windows and several windows long, prefilled in 256-token chunks."""
    prompts = [doc_tokens[:20], doc_tokens[100:500], doc_tokens[600:1000]]
    one, three = (served(tmp_path, dar_smol_pyramid, prompts, tp) for tp in (1, 3))
    assert_same_model(one, three)
    assert 1.2 < three["kv_capacity_tokens"] / one["kv_capacity_tokens"] < 3  # far caches whole on every rank


def test_per_head_model_at_tp2_equals_tp1(tiny_dar, doc_tokens, tmp_path):
    """Per-head projections shard by KV head: each of 2 ranks holds half of both caches."""
    prompts = [doc_tokens[:6], doc_tokens[40:340]]
    one, two = (served(tmp_path, tiny_dar, prompts, tp) for tp in (1, 2))
    assert_same_model(one, two)
    assert two["kv_capacity_tokens"] / one["kv_capacity_tokens"] == pytest.approx(2, rel=0.01)


def test_vllm_serve_at_tp3(dar_smol_pyramid, doc_tokens, tmp_path):
    """``vllm serve --tensor-parallel-size 3`` on the joint model (vLLM's default processes: API server, engine
    core, one worker per rank): a completion of a prompt several windows long equals the Hugging Face DAR
    reference token for token."""
    from openai import OpenAI

    from vllm_dar.evaluate import greedy, load_for_eval

    from .helpers import start_server, stop_server, wait_ready

    prompt, log = doc_tokens[100:500], tmp_path / "serve.log"
    proc, port = start_server(dar_smol_pyramid, log, "--dtype", "float32", "--max-model-len", "1024",
                              "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "3",
                              env=cpu_thread_binding(3))
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout=600, log=log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=300)
        out = client.completions.create(model=dar_smol_pyramid, prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"return_token_ids": True, "ignore_eos": True})
    finally:
        stop_server(proc)
    assert "tensor parallel size 3: one rank holds" in log.read_text()
    model, _, cfg, projections = load_for_eval(dar_smol_pyramid, "float32")
    assert out.choices[0].token_ids == greedy(model, prompt, 16, cfg=cfg, projections=projections)
