"""DAR models under tensor parallelism on vLLM's CPU engine: what one rank holds, and whether the ranks serve the
same model as one process.

For each model (stock, the recommended recipe with its joint projections, and optionally a per-head conversion)
at tensor-parallel size 1 and ``--tp``: vLLM's logged KV capacity (tokens that fit in one rank's KV memory,
``VLLM_CPU_KVCACHE_SPACE`` GiB per rank) at ``--context``, the byte model's bytes per token per rank
(``DarConfig.rank_kv_bytes_per_token``), and greedy tokens and log-probabilities of held-out documentation prompts
against the same model at size 1. Not a speed benchmark: the ranks of a CPU engine share this machine's cores.

    python benchmarks/tensor_parallel.py [--stock DIR] [--dar DIR] [--per-head DIR] [--tp 3] [--save]

Each engine runs in a fresh subprocess; threads bound per rank with ``vllm_engine.cpu_thread_binding``. Results go
to ``benchmarks/results/tensor_parallel.json`` with ``--save``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import harness

LENGTHS = (100, 700, 1500, 3000)


def prompts(model: str, context: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_dar.data import split_files, token_windows

    tok = AutoTokenizer.from_pretrained(model)
    doc = token_windows(tok, split_files()[1][:60], context=context, max_windows=1)[0]
    return [doc[:n] for n in LENGTHS if n < context]


def run_engine(job: dict) -> dict:
    """Greedy tokens, their log-probabilities and vLLM's logged capacity (runs in the worker subprocess)."""
    from vllm import SamplingParams, TokensPrompt

    from vllm_dar.vllm_engine import make_llm, shutdown_llm

    llm = make_llm(job["model"], max_model_len=job["context"], dtype="float32",
                   tensor_parallel_size=job["tp"], enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
        capacity = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
    finally:
        shutdown_llm(llm)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [[s[t].logprob for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         for o in outs],
            "capacity_tokens": capacity}


def spawn(job: dict, quiet: bool) -> dict:
    from vllm_dar.vllm_engine import cpu_thread_binding

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job.json")
        harness.write_json(path, job, indent=None)
        env = {**os.environ, **cpu_thread_binding(job["tp"])}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        return harness.run_worker(__file__, ["--worker", path], env=env, show_output=not quiet)[0]


def rank_bytes(model: str, context: int, tp: int) -> float:
    """Bytes per token one rank holds at ``context`` (fp32), from the byte model."""
    from transformers import AutoConfig

    from vllm_dar.config import DarConfig, ModelShape

    cfg = DarConfig.from_model_dir(model)
    if cfg is None:
        return ModelShape.from_hf_config(AutoConfig.from_pretrained(model)).kv_bytes_per_token(4) / tp
    return cfg.rank_kv_bytes_per_token(context, 4, tp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_model_args(ap)
    ap.add_argument("--per-head", help="also a per-head DAR conversion (vllm-dar convert --head-sharing per_head)")
    ap.add_argument("--tp", type=int, default=3, help="tensor-parallel size beside 1 (SmolLM2-135M: 3)")
    ap.add_argument("--context", type=int, default=4096, help="max_model_len: the context capacity is counted at")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json", action="store_true", help="print only the JSON result (engine logs silenced)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/tensor_parallel.json")
    harness.add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        with open(args.worker) as f:
            harness.write_json(args.out, run_engine(json.load(f)), indent=None)
        return

    models = {"stock": args.stock, "dar": args.dar, **({"dar-per-head": args.per_head} if args.per_head else {})}
    batch = prompts(args.stock, args.context)
    rows = []
    for name, model in models.items():
        runs = {tp: spawn({"model": model, "tp": tp, "context": args.context, "max_tokens": args.max_tokens,
                           "prompts": batch}, args.json) for tp in (1, args.tp)}
        one, many = runs[1], runs[args.tp]
        rows.append({
            "engine": name, "model": model, "tp": args.tp,
            "capacity_tokens": {str(tp): r["capacity_tokens"] for tp, r in runs.items()},
            "rank_bytes_per_token": {str(tp): rank_bytes(model, args.context, tp) for tp in runs},
            "tokens_equal": one["tokens"] == many["tokens"],
            "max_logprob_diff": max(abs(a - b) for x, y in zip(one["logprobs"], many["logprobs"])
                                    for a, b in zip(x, y)),
        })
    stock = {tp: rows[0]["capacity_tokens"][tp] for tp in rows[0]["capacity_tokens"]}
    for row in rows:
        row["capacity_vs_stock"] = {tp: row["capacity_tokens"][tp] / stock[tp] for tp in stock}
    result = {"settings": {"context": args.context, "tp": args.tp, "prompt_lengths": [len(p) for p in batch],
                           "max_tokens": args.max_tokens, "kv_gib_per_rank": os.environ.get(
                               "VLLM_CPU_KVCACHE_SPACE", "1")},
              "rows": rows}
    if args.save:
        harness.write_json(os.path.join(harness.RESULTS, "tensor_parallel.json"), result)
    print(json.dumps(result, indent=2) if args.json else markdown(result))


def markdown(result: dict) -> str:
    tp = str(result["settings"]["tp"])
    header = ["engine", "capacity TP=1 (tokens)", f"capacity TP={tp}", f"TP={tp} / TP=1",
              f"vs stock at TP={tp}", f"bytes/token per rank at TP={tp} (byte model)",
              f"greedy tokens TP={tp} = TP=1", "max |logprob diff|"]
    rows = [[r["engine"], r["capacity_tokens"]["1"], r["capacity_tokens"][tp],
             f"{r['capacity_tokens'][tp] / r['capacity_tokens']['1']:.2f}x", f"{r['capacity_vs_stock'][tp]:.2f}x",
             f"{r['rank_bytes_per_token'][tp]:.0f}", "yes" if r["tokens_equal"] else "no",
             f"{r['max_logprob_diff']:.1e}"] for r in result["rows"]]
    return harness.markdown_table(header, rows)


if __name__ == "__main__":
    main()
