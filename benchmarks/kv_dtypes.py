"""What vLLM 0.32's CPU platform does with every ``--kv-cache-dtype`` it lists, for stock and for a DAR model.

For each value of vLLM's ``CacheDType`` and each engine (``stock``: ``--stock``; ``dar``: ``--dar``), one fresh
process builds ``LLM(model, kv_cache_dtype=X, dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 MiB,
enforce_eager=True)`` and generates 4 greedy tokens for a 100-token prompt. The result per pair: ``served`` (with
the cache dtype the engine kept and its logged KV capacity in tokens, which grows as the element shrinks: a
platform that silently fell back to ``auto`` shows here) or ``refused`` with the line of the error that stopped
it (vllm-dar's own, if any).

    python benchmarks/kv_dtypes.py --json > benchmarks/results/kv_dtypes.json   # ~40 engines, ~20 min here
    python benchmarks/kv_dtypes.py --dtypes auto,fp8,int8_per_token_head        # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import typing

import harness


def cache_dtypes() -> list[str]:
    from vllm.config.cache import CacheDType

    return list(typing.get_args(CacheDType))


def measure(model: str, kv_cache_dtype: str) -> dict:
    """One engine (runs in the subprocess)."""
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_dar.vllm_engine import shutdown_llm

    llm = LLM(model=model, kv_cache_dtype=kv_cache_dtype, dtype="float32", max_model_len=256,
              kv_cache_memory_bytes=64 * 2**20, enforce_eager=True, seed=0)
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=list(range(1000, 1100)))],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        config = llm.llm_engine.vllm_config
        return {"outcome": "served", "cache_dtype_kept": config.cache_config.cache_dtype,
                "kv_capacity_tokens": config.cache_config.kv_cache_size_tokens,
                "tokens": list(out[0].outputs[0].token_ids)}
    finally:
        shutdown_llm(llm)


def run(script: str, engine: str, model: str, dtype: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="vllm-dar-kv-dtypes-") as tmp:
        out = os.path.join(tmp, "result.json")
        done = subprocess.run([sys.executable, script, "--worker", model, "--kv-cache-dtype", dtype, "--out", out],
                              capture_output=True, text=True, timeout=900, check=False)
        if done.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
        log = done.stdout + done.stderr
        errors = [line for line in log.splitlines() if re.search(r"(Error|Exception|error:)", line)
                  and "Traceback" not in line]
        message = next((e for e in reversed(errors) if "vllm-dar" in e), errors[-1] if errors else log[-300:])
        return {"outcome": "refused", "error": re.sub(r"^.*?\] ", "", message.strip())[:400]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_model_args(ap)
    ap.add_argument("--dtypes", default=None, help="comma-separated subset of vLLM's CacheDType (default: all)")
    ap.add_argument("--engines", default="stock,dar")
    ap.add_argument("--kv-cache-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    harness.add_worker_args(ap)
    a = ap.parse_args()
    if a.worker:
        harness.write_json(a.out, measure(a.worker, a.kv_cache_dtype), indent=None)
        return 0
    dtypes = a.dtypes.split(",") if a.dtypes else cache_dtypes()
    result = {"settings": {"stock": a.stock, "dar": a.dar}, "dtypes": {}}
    for d in dtypes:
        result["dtypes"][d] = {}
        for e in a.engines.split(","):
            r = run(os.path.abspath(__file__), e, a.dar if e == "dar" else a.stock, d)
            result["dtypes"][d][e] = r
            print(f"{d:22s} {e:5s} {r['outcome']}: {r.get('error') or r.get('kv_capacity_tokens')}",
                  file=sys.stderr, flush=True)
    if a.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
