"""Greedy agreement of the DAR model served by vLLM with the reference, in fp32 and in bf16.

The reference is ``vllm-dar generate --engine hf`` (dense DAR attention on the Hugging Face engine, fp32). vLLM
serves the same DAR checkpoint through the plugin in fp32 (must be identical: same math, only summation order
differs) and in bf16 (weights, activations and both caches in bf16: tokens drift once a near-tie flips). For
scale, the same two dtypes on stock vLLM and the full model show how much bf16 alone moves greedy tokens.

Prompts: held-out documentation text (``vllm_dar.data``), lengths shorter than, equal to and several blocks longer
than the window, all in one batch (prefills and decodes mix). Each engine runs in a fresh subprocess. Run::

    python benchmarks/agreement.py --dar DIR [--stock DIR] [--max-tokens 32] [--json]

Results go to ``benchmarks/results/agreement.json`` with ``--save``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import harness

LENGTHS = (20, 64, 200, 700)


def prompts(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from vllm_dar.data import split_files, token_windows

    tok = AutoTokenizer.from_pretrained(model)
    docs = token_windows(tok, split_files()[1][:40], context=1024, max_windows=2)
    return [doc[:n] for doc in docs for n in LENGTHS]


def run_vllm(model: str, dtype: str, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from a real vLLM engine (runs in the worker subprocess)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_dar.vllm_engine import shutdown_llm

    llm = LLM(model=model, dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.5, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    finally:
        shutdown_llm(llm)
    return [list(o.outputs[0].token_ids) for o in outs]


def spawn(model: str, dtype: str, batch: list[list[int]], max_tokens: int, quiet: bool) -> list[list[int]]:
    """Greedy tokens of ``run_vllm`` in a fresh interpreter (the prompts go through a job file)."""
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, "job.json")
        harness.write_json(job, {"model": model, "dtype": dtype, "batch": batch, "max_tokens": max_tokens})
        return harness.run_worker(__file__, ["--worker", job], show_output=not quiet)[0]["tokens"]


def reference(model: str, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm_dar.evaluate import greedy, load_for_eval

    hf, _, cfg, projections = load_for_eval(model, "float32")
    return [greedy(hf, p, max_tokens, cfg=cfg, projections=projections) for p in batch]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dar", help="DAR-converted fp32 checkpoint (required)")
    harness.add_model_args(ap, dar=False)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="print only the JSON result (engine logs silenced)")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/agreement.json")
    harness.add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        with open(args.worker) as f:
            job = json.load(f)
        tokens = run_vllm(job["model"], job["dtype"], job["batch"], job["max_tokens"])
        harness.write_json(args.out, {"tokens": tokens}, indent=None)
        return
    if not args.dar:
        ap.error("--dar is required")

    batch = prompts(args.dar)
    ref = reference(args.dar, batch, args.max_tokens)
    got = {(name, dtype): spawn(model, dtype, batch, args.max_tokens, args.json)
           for name, model in (("dar", args.dar), ("stock", args.stock)) for dtype in ("float32", "bfloat16")}
    result = {
        "settings": {"dar": args.dar, "stock": args.stock, "prompt_lengths": [len(p) for p in batch],
                     "max_tokens": args.max_tokens},
        "dar_vllm_fp32_vs_reference": harness.token_agreement(got["dar", "float32"], ref),
        "dar_vllm_bf16_vs_reference": harness.token_agreement(got["dar", "bfloat16"], ref),
        "dar_vllm_bf16_vs_fp32": harness.token_agreement(got["dar", "bfloat16"], got["dar", "float32"]),
        "stock_vllm_bf16_vs_fp32": harness.token_agreement(got["stock", "bfloat16"], got["stock", "float32"]),
    }
    text = json.dumps(result, indent=2)
    if args.save:
        harness.write_json(os.path.join(harness.RESULTS, "agreement.json"), result)
    print(text)


if __name__ == "__main__":
    main()
