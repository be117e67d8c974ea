"""The pure parts of the benchmarks (``benchmarks/harness.py`` and the scripts over it): the max_tokens
stagger, the decode-step filter, workers in subprocesses, weight bytes, tables, default paths, the K/V
byte counts, which must be ``vllm_dar.config``'s byte model, ``serve.py``'s workloads, metrics, summary and
process handling (against a fake ``vllm``), ``longcontext.py``'s prompts, scoring and report, and
``fp8_scales.py``'s rounding modes."""
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
import longcontext
import serve
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
    assert tp.kv_bytes_per_request("stock", path, 100, "float32") == 100 * per_tok * 4
    assert tp.kv_bytes_per_request("stock", path, 100, "bfloat16") == 100 * per_tok * 2
    assert tp.kv_bytes_per_request("fp8", path, 100, "bfloat16") == 100 * per_tok
    # DAR: reduced K/V (2 + 3 per KV head) of all 100 tokens + full width of window 4 + 1 sink, per layer, fp32
    assert tp.kv_bytes_per_request("dar", path, 100, "float32") == 2 * (100 * 2 * 5 + 5 * 2 * 2 * 8) * 4
    assert tp.kv_bytes_per_request("dar", path, 100, "bfloat16") == cfg.kv_elems(100) * 2
    # FP8: DAR's far cache at one byte beside the window in the served dtype; both at one byte with the window flag
    assert tp.kv_bytes_per_request("dar-fp8", path, 100, "float32") == 2 * (100 * 2 * 5 + 5 * 2 * 2 * 8 * 4)
    assert tp.kv_bytes_per_request("dar-fp8-window", path, 100, "float32") == cfg.kv_elems(100)


def test_decode_bound_reads_the_byte_model(tmp_path):
    """The bound's K/V is what a decode step reads (far positions reduced, window and sinks at full width),
    and DAR's projections come once per step from the byte model, not from the projection file."""
    path, cfg = dar_dir(tmp_path)
    b = cfg.decode_bytes(100, 4)
    assert tp.decode_read_bytes("dar", path, 100, 8, "float32") == {"per_request": b.dar, "projections": b.projections,
                                                         "total": 8 * b.dar + b.projections}
    assert b.dar == 2 * ((100 - 5) * 2 * 5 + 5 * 2 * 2 * 8) * 4
    assert tp.decode_read_bytes("fp8", path, 100, 8, "float32")["total"] == 8 * b.full // 4
    bf16 = cfg.decode_bytes(100, 2)  # the K/V in the served dtype; projections stay fp32
    assert tp.decode_read_bytes("dar", path, 100, 8, "bfloat16")["total"] == 8 * bf16.dar + b.projections


def test_capacity_theory_uses_the_served_dtype(tmp_path):
    """A bf16 checkpoint served in fp32 caches 4 bytes per element: the theoretical figure follows the
    engine."""
    path, cfg = dar_dir(tmp_path, dtype="bfloat16")
    r = capacity.bytes_per_token(path, 1, 2**20, itemsizes=(4, 4))
    assert r["bytes_per_token_theoretical"] == cfg.kv_bytes_per_token(capacity.MAX_MODEL_LEN, 4)
    assert r["bytes_per_token_full"] == 2 * 2 * 2 * 8 * 4
    assert r["bytes_per_token_allocated"] == 2**30 / 2**20


def test_capacity_itemsizes_follow_the_fp8_layout(tmp_path, monkeypatch):
    """FP8 covers a stock model's whole cache, a DAR model's far cache, and its window too with
    VLLM_DAR_FP8_WINDOW=1 (vllm_dar.kv_dtype.cache_dtypes); the theory prices each cache at its own size."""
    path, cfg = dar_dir(tmp_path)
    stock = os.path.join(tmp_path, "stock")
    os.makedirs(stock)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw.pop("dar")
    with open(os.path.join(stock, "config.json"), "w") as f:
        json.dump(raw, f)
    monkeypatch.delenv("VLLM_DAR_FP8_WINDOW", raising=False)
    assert capacity.cache_itemsizes(stock, "fp8", 4) == (1, 1) and capacity.cache_itemsizes(stock, "auto", 4) == (4, 4)
    assert capacity.cache_itemsizes(path, "fp8", 4) == (4, 1) and capacity.cache_itemsizes(path, "auto", 2) == (2, 2)
    r = capacity.bytes_per_token(path, 1, 2**20, itemsizes=(4, 1))
    assert r["bytes_per_token_theoretical"] == cfg.kv_bytes_per_token(capacity.MAX_MODEL_LEN, 4, 1)
    monkeypatch.setenv("VLLM_DAR_FP8_WINDOW", "1")
    assert capacity.cache_itemsizes(path, "fp8", 4) == (1, 1)


def test_capacity_theory_table_prices_each_layout_by_hand(tmp_path):
    """``capacity.py --theory``: per token of a 100-token request, stock 2 layers x K+V x 2 KV heads x 8 dims;
    DAR reduced K/V (2 + 3 per KV head) of every token plus full width of window 4 + 1 sink, each cache at its
    own element size; the ratios are capacities (bytes inverted)."""
    path, _ = dar_dir(tmp_path)
    stock = tmp_path / "stock"
    stock.mkdir()
    (stock / "config.json").write_text(json.dumps({**SHAPE, "dtype": "float32"}))
    t = capacity.theory_table(str(stock), path, 100)
    full, far, window = 2 * 2 * 2 * 8, 2 * 2 * 5, 2 * 5 * 2 * 2 * 8  # per token; window: elements per request
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        b = t[dtype]["bytes_per_token"]
        assert b["stock"] == full * size and b["stock-fp8"] == full
        assert b["dar-fp8-window"] == pytest.approx(far + window / 100)
        assert b["dar"] == pytest.approx((far + window / 100) * size)
        assert b["dar-fp8"] == pytest.approx(far + window / 100 * size)
        assert t[dtype]["capacity_ratios"]["dar-fp8/dar"] == pytest.approx(b["dar"] / b["dar-fp8"], abs=1e-3)
    # --dar-fp8: the FP8 rows price another conversion (one priced for an FP8 far cache), DAR's stays --dar's
    other = tmp_path / "fp8"
    other.mkdir()
    cfg8 = DarConfig.uniform(ModelShape.from_hf_config(SHAPE), window=2, key_rank=4, value_rank=4, sink_tokens=1)
    (other / "config.json").write_text(json.dumps({**SHAPE, "dtype": "float32", "dar": cfg8.to_json()}))
    t8 = capacity.theory_table(str(stock), path, 100, dar_fp8=str(other))
    b8 = t8["bfloat16"]["bytes_per_token"]
    assert b8["dar"] == t["bfloat16"]["bytes_per_token"]["dar"]
    assert b8["dar-fp8"] == pytest.approx(cfg8.kv_bytes_per_token(100, 2, 1), abs=0.1) != t["bfloat16"][
        "bytes_per_token"]["dar-fp8"]


def test_capacity_held_reads_the_most_running_pure_decode_steps():
    """Blocks per request come from pure decode steps (no prefill) at the most requests running; a step
    that also prefills, or runs fewer requests, does not count."""
    steps = [{"ctx": 1, "gen": 4, "kv_usage": 0.9}, {"ctx": 0, "gen": 3, "kv_usage": 0.9},
             {"ctx": 0, "gen": 4, "kv_usage": 0.4}, {"ctx": 0, "gen": 4, "kv_usage": 0.41},
             {"ctx": 0, "gen": 4, "kv_usage": 0.42}]
    h = capacity.held(steps, num_blocks=101, block_bytes=10.0, tokens=20)
    assert h["running"] == 4 and h["steps"] == 3
    assert h["blocks_per_request"] == pytest.approx(0.41 * 100 / 4)
    assert h["bytes_per_token"] == pytest.approx(0.41 * 100 / 4 * 10.0 / 20)
    assert capacity.held(steps[:1], num_blocks=101, block_bytes=10.0, tokens=20) is None


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


# ---------------------------------------------------------------- serve.py

def test_serve_workloads_and_run_plan():
    ws = serve.parse_workloads(["decode-heavy,prompt-heavy", "4:64:16", "decode-heavy"])
    assert [w.name for w in ws] == ["decode-heavy", "prompt-heavy", "4x64-16"]
    assert (ws[2].num_prompts, ws[2].input_len, ws[2].output_len, ws[2].request_rate) == (4, 64, 16, None)
    inf = float("inf")
    assert [(w.name, r) for w, r in serve.run_plan(ws, None)] == [
        ("decode-heavy", inf), ("decode-heavy", 0.1), ("prompt-heavy", inf), ("prompt-heavy", 0.05),
        ("4x64-16", inf)]
    assert [r for _, r in serve.run_plan(ws[:1], 0.3)] == [inf, 0.3]
    assert [r for _, r in serve.run_plan(ws[:1], inf)] == [inf]  # all at once only
    for bad in ("4:64", "nope", "0:64:16", "4:64:x"):
        with pytest.raises(SystemExit, match="--workload"):
            serve.parse_workloads([bad])
    with pytest.raises(SystemExit, match="--engines"):
        serve.parse_engines("stock,fp8")
    assert serve.parse_engines("dar,stock,dar") == ["dar", "stock"]
    assert serve.rate_label(inf) == "inf" and serve.rate_label(0.25) == "0.25"


def test_serve_defaults_are_kv_bound():
    """At the default --kv-gib, in bf16, stock cannot hold every request of the KV-bound workloads at full
    length (vLLM's CPU blocks hold 128 tokens)."""
    a = serve.parse_args([])
    assert [w.name for w in a.workloads] == ["decode-heavy", "prompt-heavy"] and a.dtype == "bfloat16"
    blocks = a.kv_gib * 2**30 // (128 * ModelShape.from_hf_config(
        {**SHAPE, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64}).kv_bytes_per_token(2))
    for w in a.workloads:
        assert blocks // -(-(w.input_len + w.output_len) // 128) < w.num_prompts


def test_serve_bench_command_asks_for_p99_and_the_rate():
    cmd = serve.bench_command("/m", 8000, serve.WORKLOADS["prompt-heavy"], 0.05, 2, "/out", "x.json")
    joined = " ".join(cmd)
    assert "--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99" in joined
    assert "--request-rate 0.05 " in joined and "--num-prompts 32 " in joined and "127.0.0.1:8000" in joined
    assert serve.serve_command("/m", "stock-fp8", 1, "bfloat16", 100)[-2:] == ["--kv-cache-dtype", "fp8"]
    assert "--kv-cache-dtype" not in serve.serve_command("/m", "dar", 1, "bfloat16", 100)


def test_serve_parses_prometheus_and_counts_preemptions():
    text = ('# HELP vllm:num_requests_running Number of requests in model execution batches.\n'
            '# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="/a b{c}"} 7.0\n'
            'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0\n'
            'vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9\n'
            'process_cpu_seconds_total 12.5\n')
    assert serve.parse_prometheus(text) == {"vllm:num_requests_running": 7.0, "vllm:num_preemptions_total": 3.0,
                                            "vllm:num_preemptions_created": 1.7e9, "process_cpu_seconds_total": 12.5}
    assert serve.parse_prometheus(text, {"vllm:num_requests_running"}) == {"vllm:num_requests_running": 7.0}
    p = serve.PROMETHEUS
    scrapes = [{p["running"]: 2, p["preemptions"]: 1}, {p["running"]: 9, p["waiting"]: 4, p["preemptions"]: 5}]
    assert serve.metrics_summary(scrapes, scrapes[0], scrapes[1]) == {
        "peak_running": 9, "peak_waiting": 4, "peak_kv_cache_usage": None, "preemptions": 4, "metrics_scrapes": 2}
    assert serve.metrics_summary(scrapes, None, scrapes[1])["preemptions"] is None


def fake_records():
    rec = {"workload": "quick", "request_rate": "inf"}
    return [{**rec, "engine": "stock", "output_throughput": 10.0, "median_tpot_ms": 200.0, "preemptions": 0},
            {**rec, "engine": "dar", "output_throughput": 25.0, "median_tpot_ms": 150.0, "preemptions": 3},
            {**rec, "engine": "stock-fp8", "error": "vllm bench serve exited with 1"}]


def test_serve_summary_ratios_table_and_plot(tmp_path):
    settings = {"engines": ["stock", "stock-fp8", "dar"], "workloads": [vars(serve.WORKLOADS["quick"])],
                "dtype": "bfloat16", "kv_gib": 1}
    summary = serve.summarize(settings, fake_records(), {})
    (run,) = summary["runs"]
    assert run["ratio_to_stock"] == {"dar": {"output_throughput": 2.5, "median_tpot_ms": 0.75}}  # no x / 0
    assert run["engines"]["stock-fp8"] == {"error": "vllm bench serve exited with 1"}
    table = serve.format_table(summary)
    assert "quick, all at once: 16 x 512 in / 64 out" in table
    assert "output tokens/s" in table and "2.500x" in table and "stock-fp8: FAILED" in table
    json.dumps(summary)  # JSON-clean (no inf)
    if harness.pyplot() is None:
        pytest.skip("matplotlib is not installed")
    assert serve.plot(summary, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


FAKE_VLLM = r"""
import http.server, json, os, sys, time
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
if args[0] == "serve":
    with open(os.environ["FAKE_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")
    scrapes = [0]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b""
            if self.path == "/metrics":
                scrapes[0] += 1
                body = (f'vllm:num_requests_running{{engine="0"}} {min(scrapes[0], 3)}.0\n'
                        f'vllm:num_preemptions_total{{engine="0"}} {scrapes[0]}.0\n').encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(opt("--port"))), H).serve_forever()
model = opt("--model")
time.sleep(float(os.environ.get("FAKE_BENCH_S", "0.3")))
result = {"output_throughput": 20.0 if "dar" in model else 10.0, "completed": int(opt("--num-prompts"))}
with open(os.path.join(opt("--result-dir"), opt("--result-filename")), "w") as f:
    json.dump(result, f)
print("==== Serving Benchmark Result ====\nok\n====")
"""


def run_fake_serve(tmp_path, monkeypatch, *argv):
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM)
    monkeypatch.setattr(serve, "vllm_command", lambda: [sys.executable, str(fake)])
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path / "pids"))
    (tmp_path / "dar-model").mkdir()
    dar, _ = dar_dir(tmp_path / "dar-model")
    out = tmp_path / "out"
    code = serve.main(["--stock", str(tmp_path / "stock"), "--dar", dar, "--engines", "stock,dar",
                       "--out-dir", str(out), "--metrics-interval", "0.05", "--json", *argv])
    for pid in map(int, (tmp_path / "pids").read_text().split()):  # every server stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    return code, json.loads((out / "summary.json").read_text())


def test_serve_runs_every_engine_and_stops_its_servers(tmp_path, monkeypatch):
    code, summary = run_fake_serve(tmp_path, monkeypatch, "--workload", "2:8:4", "--request-rate", "5")
    assert code == 0 and [(r["workload"], r["request_rate"]) for r in summary["runs"]] == [
        ("2x8-4", "inf"), ("2x8-4", "5")]
    run = summary["runs"][0]
    assert run["ratio_to_stock"]["dar"]["output_throughput"] == 2.0
    stock = run["engines"]["stock"]
    assert stock["completed"] == 2 and stock["peak_running"] >= 1 and stock["preemptions"] >= 1
    assert (tmp_path / "out" / "2x8-4-5-dar.json").exists()
    assert len((tmp_path / "pids").read_text().split()) == 2  # one server per engine


def test_serve_times_out_a_run_and_restarts_its_server(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_BENCH_S", "30")
    code, summary = run_fake_serve(tmp_path, monkeypatch, "--workload", "2:8:4", "--request-rate", "5",
                                   "--timeout", "0.5")
    assert code == 1
    for run in summary["runs"]:
        assert all("--timeout" in e["error"] for e in run["engines"].values())
    assert len((tmp_path / "pids").read_text().split()) == 4  # a fresh server after each failed run


def test_longcontext_prompts_plant_the_key_at_its_depth(default_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    items = longcontext.prompts(tok, [300, 700], [0.0, 0.5, 1.0], 2, seed=3)
    assert [(p["context"], p["depth"], p["trial"]) for p in items] == [
        (c, d, t) for c in (300, 700) for d in (0.0, 0.5, 1.0) for t in (0, 1)]
    for p in items:
        ids, code = p["ids"], p["code"]
        assert len(ids) == p["context"] and len(code) == 5 and code[0] != "0"
        needle = tok(longcontext.NEEDLE.format(code=code), add_special_tokens=False)["input_ids"]
        question = tok(longcontext.QUESTION.format(first=code[0]), add_special_tokens=False)["input_ids"]
        assert ids[p["needle_at"]:p["needle_at"] + len(needle)] == needle
        assert ids[-len(question):] == question
        fill = p["context"] - len(needle) - len(question)
        assert p["needle_at"] == round(p["depth"] * fill)  # depth 0: first; depth 1: right before the question
    assert [p["code"] for p in items] == [p["code"] for p in longcontext.prompts(tok, [300, 700], [0.0, 0.5, 1.0],
                                                                                  2, seed=3)]
    assert len({p["code"] for p in items}) > 1


def test_longcontext_scores_the_four_digits_after_the_given_one():
    assert longcontext.score("58213", "8213. Remember it.") == (True, 1.0)
    assert longcontext.score("58213", " 8 2 1 3") == (True, 1.0)
    assert longcontext.score("58213", "8218.") == (False, 0.75)
    assert longcontext.score("58213", "58213") == (False, 0.0)  # repeating the given digit shifts every place
    assert longcontext.score("58213", ".\n\nThe pass key") == (False, 0.0)


def test_longcontext_report_cells_table_bytes_and_plot(tmp_path):
    items = [{"context": c, "depth": d, "code": "12345"} for c in (100, 200) for d in (0.1, 0.9) for _ in range(2)]
    answers = ["2345", "2340", "2345", "2345", "9", "2345", "", ""]
    cells = longcontext.cells(items, answers)
    assert [(c["context"], c["depth"], c["accuracy"], c["digits"]) for c in cells] == [
        (100, 0.1, 0.5, 0.875), (100, 0.9, 1.0, 1.0), (200, 0.1, 0.5, 0.5), (200, 0.9, 0.0, 0.0)]
    path, cfg = dar_dir(tmp_path)
    dar = longcontext.kv_bytes("dar", path, [100, 200], "float32")
    assert dar["100"]["bytes"] == cfg.kv_elems(100) * 4
    assert dar["200"]["fraction_of_stock"] == pytest.approx(cfg.kv_fraction(200))
    assert longcontext.kv_bytes("full", path, [100], "float32")["100"] == {"bytes": 100 * 64 * 4,
                                                                           "fraction_of_stock": 1.0}
    result = {"settings": {"contexts": [100, 200], "depths": [0.1, 0.9], "dtype": "float32", "trials": 2,
                           "budget": "0.1"},
              "rows": {"full": {"cells": cells, "kv_bytes": longcontext.kv_bytes("full", path, [100, 200],
                                                                                 "float32")},
                       "dar": {"cells": cells, "kv_bytes": dar}}}
    table = longcontext.table(result)
    assert "| 100 tokens | 50% (88%) | 100% (100%) |" in table
    assert f"| dar | 75% / 94% / {cfg.kv_fraction(100):.1%} | 25% / 25% / {cfg.kv_fraction(200):.1%} |" in table
    if harness.pyplot() is None:
        pytest.skip("matplotlib is not installed")
    assert longcontext.plot(result, str(tmp_path / "l.png"))
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"


def test_kernels_tune_dry_run_checks_every_variant(tmp_path):
    """benchmarks/kernels_tune.py --dry (tiny shapes, Triton's interpreter): every part runs through the real
    launcher with its overrides, and each swept variant computes what the default launch does."""
    import subprocess

    out = tmp_path / "tune.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "kernels_tune.py"), "--dry", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["variant"] for r in rows if r.get("part") == "split"} == {
        "whole", "without_dar_query_project_kernel", "without_dar_far_kernel", "without_dar_full_kernel"}
    swept = [r for r in rows if r.get("part") in ("far", "full")]
    assert {r["part"] for r in swept} == {"far", "full"}
    assert all("error" not in r and r["err"] < 1e-5 for r in swept), swept


def test_fp8_scales_modes_round_as_stated_and_restore_the_reference(tiny_dar):
    """``fp8_scales.py``: mode ``one`` is exactly the reference's own FP8 rounding (scale 1), the other modes
    change what is rounded, ``token`` keeps each row's largest element, and the reference is restored after."""
    import fp8_scales

    from vllm_dar import hf, kv_dtype, reference
    from vllm_dar.evaluate import load_for_eval, perplexity

    model, _, cfg, proj = load_for_eval(tiny_dar, "float32")
    torch.manual_seed(0)
    windows = torch.randint(0, 49152, (2, 48)).tolist()  # past window 8 + 2 sinks: far and window caches both used
    amax = fp8_scales.calibration_amax(model, proj, windows[:1])
    assert sorted(amax) == sorted((i, k) for i in range(2) for k in ("k", "v", "kr", "vr"))
    assert all(v > 0 for v in amax.values())
    e4 = fp8_scales.E4M3

    def ppl(**kw):
        return perplexity(model, windows, cfg=cfg, projections=proj, kv_dtype=e4, **kw)["perplexity"]

    def stock():
        return perplexity(model, windows, kv_dtype=e4)["perplexity"]

    plain, plain_far, plain_stock = ppl(), ppl(far_only=True), stock()
    fns = hf._dar_layer_fn, reference.round_trip
    with fp8_scales.scaled("one", amax):
        assert (ppl(), ppl(far_only=True), stock()) == (plain, plain_far, plain_stock)
    seen = []
    scale_of = fp8_scales.mode_scale

    def recorded(mode, x, layer, kind, amax, both=True):
        seen.append((layer, kind, x.shape[-1]))
        return scale_of(mode, x, layer, kind, amax, both)

    fp8_scales.mode_scale = recorded
    try:
        for mode in ("static", "shared", "tensor", "token"):
            with fp8_scales.scaled(mode, amax):
                seen.clear()
                assert ppl() != plain, mode
                # per layer call: K~, V~ (ranks 8) then K, V (head_dim 16), over 2 layers, once per window
                assert seen == [(i, k, d) for _ in windows for i in range(2)
                                for k, d in (("kr", 8), ("vr", 8), ("k", 16), ("v", 16))], mode
                assert ppl(far_only=True) != plain_far and stock() != plain_stock, mode
    finally:
        fp8_scales.mode_scale = scale_of
    assert (hf._dar_layer_fn, reference.round_trip) == fns
    x = torch.randn(1, 2, 5, 16) * torch.logspace(-3, 1, 5).view(1, 1, 5, 1)
    kept = kv_dtype.round_trip(x, e4, fp8_scales.mode_scale("token", x, 0, "k", amax))
    torch.testing.assert_close(kept.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unknown mode"):
        fp8_scales.mode_scale("block", x, 0, "k", amax)
