"""Run one vLLM engine in its own process and print what it generated (used by the engine tests).

    python engine_job.py JOB.json OUT.json

JOB: {"model": DIR, "engine": {LLM kwargs}, "max_tokens": N, "runs": [[prompt token ids, ...], ...]}.
Runs are generated one after another on the same engine (the second run of a repeated prompt can hit the
prefix cache). OUT: {"runs": [[{"tokens": [...], "cached": num_cached_tokens}, ...], ...],
"kv_capacity_tokens": vLLM's logged KV cache capacity}.
A separate process per engine: vLLM spawns workers, and one engine's settings never leak into the next.
"""
import json
import sys


def main(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(job_path) as f:
        job = json.load(f)
    engine = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "seed": 0, **job.get("engine", {})}
    llm = LLM(model=job["model"], **engine)
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    runs = []
    for prompts in job["runs"]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens or 0} for o in outs])
    capacity = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
    with open(out_path, "w") as f:
        json.dump({"runs": runs, "kv_capacity_tokens": capacity}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
