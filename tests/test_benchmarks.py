"""The pure parts of the benchmarks (``benchmarks/harness.py`` and the scripts over it): the max_tokens
stagger, the decode-step filter, workers in subprocesses, weight bytes, tables, default paths, and the K/V
byte counts, which must be ``vllm_dar.config``'s byte model."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from vllm_dar.config import DarConfig, ModelShape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)  # appended: benchmarks/kernels.py must not shadow the tests/kernels package
import capacity
import harness
import throughput as tp

SHAPE = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "hidden_size": 32, "head_dim": 8}


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
    max_tokens = [n + e for e in harness.stagger(batch, context)]
    steps = simulate(batch, context, max_tokens, harness.MAX_BATCHED_TOKENS, late)
    full = sum(1 for pre, dec in steps if pre == 0 and dec == batch)
    assert full >= n - 1  # the last request's n - 1 decode steps, all with the whole batch


def test_stagger_without_it_too_few_full_steps():
    """The case the stagger exists for: with equal max_tokens a 32 x 8K batch never decodes all 32 at once."""
    steps = simulate(32, 8192, [32] * 32, harness.MAX_BATCHED_TOKENS)
    assert not any(pre == 0 and dec == 32 for pre, dec in steps)


def step(ctx, gen, itl):
    return {"ctx": ctx, "gen": gen, "itl": itl}


def test_decode_steps_keeps_only_pure_full_batch_steps():
    steps = [step(2, 0, []), step(1, 1, [0.9]),  # prefill, then a decode sharing a step with a prefill chunk
             step(0, 2, [0.1, 0.1]), step(0, 2, [0.3, 0.3]), step(0, 1, [0.05])]
    assert harness.decode_steps(steps, 2) == (2, [0.1, 0.3])


def test_decode_steps_falls_back_to_the_largest_decode_batch():
    steps = [step(1, 3, [0.5] * 3), step(0, 3, [0.2] * 3), step(0, 2, [0.1] * 2)]  # batch 4 never fits
    assert harness.decode_steps(steps, 4) == (3, [0.2])
    assert harness.decode_steps([step(1, 0, [])], 4) == (0, [])


def test_max_overlap_end_frees_before_start():
    assert harness.max_overlap([(0, 1), (1, 2), (1.5, 3)]) == 2


def dar_dir(tmp_path, dtype: str = "float32") -> tuple[str, DarConfig]:
    shape = ModelShape.from_hf_config(SHAPE)
    cfg = DarConfig.uniform(shape, window=4, key_rank=2, value_rank=3, sink_tokens=1)
    (tmp_path / "config.json").write_text(json.dumps({**SHAPE, "dtype": dtype, "dar": cfg.to_json()}))
    return str(tmp_path), cfg


def test_kv_bytes_match_shapes_and_dar_config(tmp_path):
    path, cfg = dar_dir(tmp_path)
    per_tok = 2 * 2 * 2 * 8  # layers * (K + V) * kv heads * head_dim
    assert tp.kv_bytes_per_request("stock", path, 100) == 100 * per_tok * 4
    assert tp.kv_bytes_per_request("fp8", path, 100) == 100 * per_tok
    # DAR: reduced K/V (2 + 3 per KV head) of all 100 tokens + full width of window 4 + 1 sink, per layer, fp32
    assert tp.kv_bytes_per_request("dar", path, 100) == 2 * (100 * 2 * 5 + 5 * 2 * 2 * 8) * 4
    assert tp.kv_bytes_per_request("dar", path, 100) == cfg.kv_elems(100) * 4


def test_decode_bound_reads_the_byte_model(tmp_path):
    """The bound's K/V is what a decode step reads (far positions reduced, window and sinks at full width),
    and DAR's projections come once per step from the byte model, not from the projection file."""
    path, cfg = dar_dir(tmp_path)
    b = cfg.decode_bytes(100, 4)
    assert tp.decode_read_bytes("dar", path, 100, 8) == {"per_request": b.dar, "projections": b.projections,
                                                         "total": 8 * b.dar + b.projections}
    assert b.dar == 2 * ((100 - 5) * 2 * 5 + 5 * 2 * 2 * 8) * 4
    assert tp.decode_read_bytes("fp8", path, 100, 8)["total"] == 8 * b.full // 4


def test_capacity_theory_uses_the_served_dtype(tmp_path):
    """A bf16 checkpoint served in fp32 caches 4 bytes per element: the theoretical figure follows the
    engine."""
    path, cfg = dar_dir(tmp_path, dtype="bfloat16")
    r = capacity.bytes_per_token(path, 1, 2**20, itemsize=4)
    assert r["bytes_per_token_theoretical"] == cfg.kv_bytes_per_token(capacity.MAX_MODEL_LEN, 4)
    assert r["bytes_per_token_full"] == 2 * 2 * 2 * 8 * 4
    assert r["bytes_per_token_allocated"] == 2**30 / 2**20


def test_weight_bytes_reads_a_tied_embedding_once_and_skips_projections(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4), "model.norm.weight": torch.zeros(4)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "dar").mkdir()
    save_file({"q_proj.0": torch.zeros(3, 3)}, str(tmp_path / "dar" / "projections.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert harness.weight_bytes(str(tmp_path)) == (40 + 4) * 4
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    # an untied input embedding is only gathered
    assert harness.weight_bytes(str(tmp_path), itemsize=2) == 4 * 2


def test_run_worker_returns_the_result_and_names_a_failure(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import json, sys\n"
                      "args = sys.argv[1:]\n"
                      "print('engine log line')\n"
                      "if args[0] == 'fail': sys.exit(3)\n"
                      "json.dump({'got': args[0]}, open(args[args.index('--out') + 1], 'w'))\n")
    result, lines = harness.run_worker(str(script), ["ok"], log_name="bench-test")
    assert result == {"got": "ok"} and lines == ["engine log line\n"]
    assert harness.run_worker(str(script), ["ok"], show_output=True) == ({"got": "ok"}, [])
    with pytest.raises(SystemExit, match=r"worker fail failed \(exit 3\); log: .*bench-test-"):
        harness.run_worker(str(script), ["fail"], log_name="bench-test")


def test_markdown_table():
    assert harness.markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |")


def test_default_models_are_the_repository_s(monkeypatch):
    monkeypatch.delenv("VLLM_DAR_MODEL", raising=False)
    assert harness.source_model() == os.path.join(REPO, "models", "smollm2-135m-f32")
    assert harness.DAR_MODEL.startswith(os.path.join(REPO, "models") + os.sep)
    monkeypatch.setenv("VLLM_DAR_MODEL", "/elsewhere/model")
    assert harness.source_model() == "/elsewhere/model"


def test_no_benchmark_names_a_machine_path():
    for name in sorted(os.listdir(BENCHMARKS)):
        if name.endswith(".py"):
            with open(os.path.join(BENCHMARKS, name)) as f:
                assert "/work/" not in f.read(), name
