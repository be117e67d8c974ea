"""Where one engine step goes: stock vs DAR, timers on vLLM's model runner, in the same run.

Each engine runs in a fresh subprocess with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core and the model
runner live in that process, so plain wall-clock wrappers see them) and ``LLM(max_model_len=--context +
--decode-tokens + 16, max_num_seqs=max(4, --batch), enable_prefix_caching=False)``,
``VLLM_CPU_KVCACHE_SPACE=--kv-gib``. After a warm-up request,
``--batch`` prompts of ``--context`` tokens (distinct token ids) generate ``--decode-tokens`` tokens each
(greedy, ``ignore_eos``, all submitted at once). A step in which every scheduled request gets one token is a
*decode step* (reported per step); the others, which carry prompt tokens, are *prefill steps* (reported summed:
at batch 1 the whole prompt is one step). Timed:

* ``step``: ``GPUModelRunner.execute_model`` (what the engine core waits on, sampling excluded);
* inside it: ``prepare_inputs`` (``_prepare_inputs``: positions, the slot mappings of every KV cache group),
  ``slot_mapping`` and ``commit_block_table`` (``MultiGroupBlockTable``'s per-group work, part of the former),
  ``attention_metadata`` (``_build_attention_metadata``; ``builders``: the metadata builders' ``build`` calls
  within it), ``model_forward`` (``_model_forward``) and, inside that, ``attention`` (the attention layers'
  ``forward`` and cache writes: stock's ``CPUAttentionBackendImpl``, DAR's ``_dar_write`` + ``_dar_forward``).

``kv_cache_groups`` is the engine's number of KV cache groups: vLLM repeats the per-group work (slot mapping,
block-table commit, metadata) once per group per step, and a DAR model whose layers have different windows or
ranks has two groups per layer (its window cache and its far cache), stock one group in all. The figures are
plain timers (microseconds of overhead each), one process per engine, so compare engines within one run.

Run (about 3 minutes on 2 cores; run it alone)::

    python benchmarks/step_split.py [--save] [--json] [--stock DIR] [--dar DIR] [--context 512] [--batch 1]
        [--decode-tokens 64] [--dtype float32] [--kv-gib 2]

``--batch 48 --context 1024 --decode-tokens 32 --kv-gib 4`` (about 8 minutes) is the decode-heavy serving
workload's shape at the batch DAR runs it (``serve.py``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import harness

TIMERS = ("step", "prepare_inputs", "slot_mapping", "commit_block_table", "attention_metadata", "builders",
          "model_forward", "attention")


def _wrap(cls, name: str, timer: str, acc: dict, state: dict) -> None:
    inner = getattr(cls, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            acc[state["phase"]][timer] += time.perf_counter() - t0

    setattr(cls, name, timed)


def worker(args: argparse.Namespace) -> dict:
    """One engine, in this process: per-step milliseconds of each timer (module docstring)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.worker import block_table, gpu_model_runner

    from vllm_dar.vllm_engine import shutdown_llm

    acc = {"prefill": collections.defaultdict(float), "decode": collections.defaultdict(float)}
    state = {"phase": "prefill", "prefill_steps": 0, "decode_steps": 0}
    runner = gpu_model_runner.GPUModelRunner
    execute = runner.execute_model

    def execute_model(self, scheduler_output, *a, **k):  # a step is a decode step when every request has one token
        per_request = scheduler_output.num_scheduled_tokens
        decode = bool(per_request) and scheduler_output.total_num_scheduled_tokens == len(per_request)
        state["phase"] = "decode" if decode else "prefill"
        t0 = time.perf_counter()
        try:
            return execute(self, scheduler_output, *a, **k)
        finally:
            acc[state["phase"]]["step"] += time.perf_counter() - t0
            state["decode_steps" if decode else "prefill_steps"] += 1

    runner.execute_model = execute_model
    _wrap(runner, "_prepare_inputs", "prepare_inputs", acc, state)
    _wrap(runner, "_build_attention_metadata", "attention_metadata", acc, state)
    _wrap(runner, "_model_forward", "model_forward", acc, state)
    _wrap(block_table.MultiGroupBlockTable, "compute_slot_mapping", "slot_mapping", acc, state)
    slot_mapping = block_table.MultiGroupBlockTable.compute_slot_mapping

    def count_groups(self, *a, **k):  # one block table per KV cache group
        state["groups"] = len(self.block_tables)
        return slot_mapping(self, *a, **k)

    block_table.MultiGroupBlockTable.compute_slot_mapping = count_groups
    _wrap(block_table.MultiGroupBlockTable, "commit_block_table", "commit_block_table", acc, state)
    _wrap(cpu_attn.CPUAttentionMetadataBuilder, "build", "builders", acc, state)
    if args.worker == "dar":
        from vllm_dar.plugin import common, cpu

        _wrap(cpu.DarCpuMetadataBuilder, "build", "builders", acc, state)
        for name in ("_dar_write", "_dar_forward"):
            _wrap(common.DarImplMixin, name, "attention", acc, state)
    else:
        for name in ("forward", "do_kv_cache_update"):
            _wrap(cpu_attn.CPUAttentionBackendImpl, name, "attention", acc, state)

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.context + args.decode_tokens + 16,
              max_num_seqs=max(4, args.batch), enable_prefix_caching=False, seed=0)
    try:
        warm = [TokensPrompt(prompt_token_ids=[1000 + i % 20000 for i in range(args.context)])]
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        for phase in acc.values():
            phase.clear()
        state.update(prefill_steps=0, decode_steps=0)
        prompts = [TokensPrompt(prompt_token_ids=[1000 + (i + 97 * b) % 20000 for i in range(args.context)])
                   for b in range(args.batch)]
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True),
                     use_tqdm=False)
        wall = time.perf_counter() - t0
        prefill_steps, decode_steps, groups = state["prefill_steps"], state["decode_steps"], state.get("groups")
    finally:
        shutdown_llm(llm)
    return {"model": args.model, "dtype": args.dtype, "context": args.context, "batch": args.batch,
            "kv_cache_groups": groups, "wall_ms_per_token": wall / args.decode_tokens * 1e3,
            "prefill_steps": prefill_steps, "decode_steps": decode_steps,
            "prefill_ms": {k: acc["prefill"][k] * 1e3 for k in TIMERS},
            "decode_ms_per_step": {k: acc["decode"][k] * 1e3 / max(1, decode_steps) for k in TIMERS}}


def table(result: dict) -> str:
    engines = [e for e in ("stock", "dar") if e in result]
    rows = []
    for phase, key in (("prefill steps", "prefill_ms"), ("decode step", "decode_ms_per_step")):
        for timer in TIMERS:
            vals = [result[e][key][timer] for e in engines]
            ratio = f"{vals[1] / vals[0]:.2f}x" if len(vals) == 2 and vals[0] > 0 else ""
            rows.append([f"{phase}: {timer}", *(f"{v:.2f}" for v in vals), ratio])
    rows.append(["KV cache groups", *(str(result[e]["kv_cache_groups"]) for e in engines), ""])
    return harness.markdown_table(["ms", *engines, "ratio" if len(engines) == 2 else ""], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(ap)
    harness.add_worker_args(ap, choices=("stock", "dar"))
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens generated (default 64)")
    ap.add_argument("--batch", type=int, default=1, help="prompts submitted at once (default 1)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE of each engine (default 2)")
    ap.add_argument("--engines", default="stock,dar")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/step_split.json "
                    "(step_split-CONTEXTxBATCH.json for other shapes)")
    args = ap.parse_args()
    if args.worker:
        harness.write_json(args.out, worker(args))
        return 0
    result = {"settings": {"stock": args.stock, "dar": args.dar, "context": args.context, "dtype": args.dtype,
                           "decode_tokens": args.decode_tokens, "batch": args.batch, "kv_gib": args.kv_gib,
                           "load_before": os.getloadavg()[0]}}
    for engine in args.engines.split(","):
        model = args.stock if engine == "stock" else args.dar
        argv = ["--worker", engine, "--model", model, "--context", str(args.context), "--decode-tokens",
                str(args.decode_tokens), "--batch", str(args.batch), "--dtype", args.dtype, "--kv-gib",
                str(args.kv_gib)]
        result[engine], _ = harness.run_worker(__file__, argv, env=harness.dar_engine_env(None))
    if args.save:
        name = "step_split.json" if (args.batch, args.context) == (1, 512) else \
            f"step_split-{args.context}x{args.batch}.json"
        harness.write_json(os.path.join(harness.RESULTS, name), result)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
