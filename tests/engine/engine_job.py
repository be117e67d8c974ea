"""Run one vLLM engine in its own process and print what it generated (used by the engine tests).

    python engine_job.py JOB.json OUT.json

JOB: {"model": DIR, "engine": {LLM kwargs}, "max_tokens": N, "runs": [[prompt token ids, ...], ...],
"logprobs": bool, "sampling": {SamplingParams kwargs over the greedy default},
"score": [[token ids], ...] (optional: windows scored by prompt log-probabilities, after the runs),
"processes": bool}.
Runs are generated one after another on the same engine (the second run of a repeated prompt can hit the
prefix cache). OUT: {"runs": [[{"tokens": [...], "cached": num_cached_tokens, "logprobs": [...] | null,
"interval"/"preemptions" (``interval``)}, ...], ...],
"kv_capacity_tokens": vLLM's logged KV cache capacity, "score": vllm_engine.windows_perplexity's result | null}.
A separate process per engine: one engine's settings never leak into the next. Inside it, the engine core
and the worker run in that one process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni": vLLM and the plugin
are imported once rather than in three processes; with ``tensor_parallel_size`` > 1 the workers, one per rank,
are vLLM's own processes) unless the job asks for ``"processes": true``,
vLLM's default layout (an engine-core and a worker process, the plugin loading in each), which `vllm serve`
always uses (tests/server).
"""
import json
import os
import sys


def logprobs(completion) -> list[float] | None:
    """Log-probability of each generated token (when the job asked for them)."""
    if completion.logprobs is None:
        return None
    return [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs)]


def interval(output) -> dict:
    """With per-request stats (``"disable_log_stats": false``): the request's [scheduled, last token] times on
    the engine core's clock and its preemptions (the intervals' overlap is how many ran at once)."""
    m = output.metrics
    if m is None or not getattr(m, "scheduled_ts", 0):
        return {}
    return {"interval": [m.scheduled_ts, m.last_token_ts], "preemptions": m.num_preemptions}


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "seed": 0, **job.get("engine", {})}
    if not job.get("processes"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when vLLM is imported (below)
        if engine.get("tensor_parallel_size", 1) == 1:  # several ranks: vLLM's worker processes ("mp")
            engine.setdefault("distributed_executor_backend", "uni")

    from vllm import LLM, SamplingParams

    from vllm_dar.vllm_engine import client_threads, shutdown_llm, windows_perplexity

    llm = LLM(model=job["model"], **engine)
    params = SamplingParams(**{"temperature": 0, "max_tokens": job["max_tokens"], "ignore_eos": True,
                               "logprobs": 0 if job.get("logprobs") else None, **job.get("sampling", {})})
    runs = []
    try:
        for prompts in job["runs"]:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            runs.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0,
                          "logprobs": logprobs(o.outputs[0]), **interval(o)} for o in outs])
        score = windows_perplexity(llm, job["score"]) if job.get("score") else None
        capacity = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
    finally:
        shutdown_llm(llm)
    with open(out_path, "w") as f:
        json.dump({"runs": runs, "kv_capacity_tokens": capacity, "score": score,
                   "client_threads_after_shutdown": client_threads()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
