"""The pure parts of ``benchmarks/throughput.py``: the max_tokens stagger, the decode-step filter, the byte counts."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from vllm_dar.config import DarConfig, ModelShape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("throughput", os.path.join(REPO, "benchmarks", "throughput.py"))
tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp)


def simulate(batch: int, context: int, max_tokens: list[int], budget: int, late: int = 0) -> list[tuple[int, int]]:
    """FCFS chunked prefill as vLLM schedules it: each step, every decoding request takes one budget token, then
    prefills fill the rest in order. Requests after the first arrive ``late`` steps late. Per step: (requests
    prefilling, requests decoding)."""
    left = [context] * batch  # prompt tokens still to prefill
    produced = [0] * batch
    steps = []
    step = 0
    while any(p < n for p, n in zip(produced, max_tokens)):
        step += 1
        decoding = [i for i in range(batch) if left[i] == 0 and 0 < produced[i] < max_tokens[i]]
        room = budget - len(decoding)
        prefilling = []
        for i in range(batch):
            if left[i] and room and (i == 0 or step > late):
                take = min(left[i], room)
                left[i] -= take
                room -= take
                prefilling.append(i)
        for i in decoding:
            produced[i] += 1
        for i in prefilling:
            if left[i] == 0:
                produced[i] += 1  # the first token, in the step that ends the prefill
        steps.append((len(prefilling), len(decoding)))
    return steps


@pytest.mark.parametrize("batch,context", [(1, 512), (8, 512), (8, 2048), (32, 512), (32, 4096), (32, 8192)])
@pytest.mark.parametrize("late", [0, 1])
def test_stagger_gives_full_batch_decode_steps(batch, context, late):
    n = 32
    steps = simulate(batch, context, [n + e for e in tp.stagger(batch, context)], tp.MAX_BATCHED_TOKENS, late)
    full = sum(1 for pre, dec in steps if pre == 0 and dec == batch)
    assert full >= n - 1  # the last request's n - 1 decode steps, all with the whole batch


def test_stagger_without_it_too_few_full_steps():
    """The case the stagger exists for: with equal max_tokens a 32 x 8K batch never decodes all 32 at once."""
    steps = simulate(32, 8192, [32] * 32, tp.MAX_BATCHED_TOKENS)
    assert not any(pre == 0 and dec == 32 for pre, dec in steps)


def step(ctx, gen, itl):
    return {"ctx": ctx, "gen": gen, "itl": itl}


def test_decode_steps_keeps_only_pure_full_batch_steps():
    steps = [step(2, 0, []), step(1, 1, [0.9]),  # prefill, then a decode sharing a step with a prefill chunk
             step(0, 2, [0.1, 0.1]), step(0, 2, [0.3, 0.3]), step(0, 1, [0.05])]
    assert tp.decode_steps(steps, 2) == (2, [0.1, 0.3])


def test_decode_steps_falls_back_to_the_largest_decode_batch():
    steps = [step(1, 3, [0.5] * 3), step(0, 3, [0.2] * 3), step(0, 2, [0.1] * 2)]  # batch 4 never fits
    assert tp.decode_steps(steps, 4) == (3, [0.2])
    assert tp.decode_steps([step(1, 0, [])], 4) == (0, [])


def test_max_overlap_end_frees_before_start():
    assert tp.max_overlap([(0, 1), (1, 2), (1.5, 3)]) == 2


def test_kv_bytes_match_shapes_and_dar_config(tmp_path):
    shape = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "hidden_size": 32, "head_dim": 8}
    cfg = DarConfig.uniform(ModelShape.from_hf_config(shape), window=4, key_rank=2, value_rank=3, sink_tokens=1)
    (tmp_path / "config.json").write_text(json.dumps({**shape, "dar": cfg.to_json()}))
    per_tok = 2 * 2 * 2 * 8  # layers * (K + V) * kv heads * head_dim
    assert tp.kv_bytes_per_request("stock", str(tmp_path), 100) == 100 * per_tok * 4
    assert tp.kv_bytes_per_request("fp8", str(tmp_path), 100) == 100 * per_tok
    # DAR: reduced K/V (2 + 3 per KV head) of all 100 tokens + full width of window 4 + 1 sink, per layer, fp32
    assert tp.kv_bytes_per_request("dar", str(tmp_path), 100) == 2 * (100 * 2 * 5 + 5 * 2 * 2 * 8) * 4
