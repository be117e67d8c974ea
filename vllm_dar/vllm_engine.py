"""``--engine vllm`` for ``vllm-dar eval`` and ``generate`` (and ``vllm-dar compare``'s engines): the same
measurements through the real vLLM engine.

A DAR-converted model is served by vllm-dar's attention backend (``vllm_dar.plugin``), which the package registers
with vLLM through its entry point. Perplexity comes from vLLM's prompt log-probabilities (``prompt_logprobs=0``:
the log-probability of each actual prompt token). vLLM spawns worker processes, so callers must run under an
``if __name__ == "__main__":`` guard (the ``vllm-dar`` console script does).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading

from .checkpoint import read_config
from .data import token_windows

DEFAULT_KV_SPACE_GIB = "2"  # VLLM_CPU_KVCACHE_SPACE when unset: vLLM's CPU memory share check refuses defaults here


def make_llm(model: str, *, max_model_len: int | None, dtype: str | None, **engine):
    """``vllm.LLM`` for ``model`` in ``dtype`` (None: the checkpoint's) and ``max_model_len`` (None: vLLM's
    default, the model's maximum context), greedy-reproducible (seed 0); ``engine``: further ``LLM`` keyword
    arguments."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_SPACE_GIB)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for our JSON
    from vllm import LLM

    # vLLM's CPU platform downcasts fp32 checkpoints to bf16 under "auto": default to the checkpoint's dtype.
    raw = read_config(model)
    dtype = dtype or raw.get("dtype") or raw.get("torch_dtype") or "auto"
    engine = {"gpu_memory_utilization": 0.5, "seed": 0, **engine}
    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, **engine)


def cpu_thread_binding(ranks: int) -> dict[str, str]:
    """The thread binding the tests and benchmarks give a CPU engine of ``ranks`` tensor-parallel workers:
    vLLM's automatic binding gives each rank a NUMA node of its own and refuses where there are fewer nodes than
    ranks (every machine of this project), so rank r takes every ``ranks``-th CPU this process may use
    (``VLLM_CPU_OMP_THREADS_BIND``, one list per rank, "|" between; ranks share CPUs when there are fewer CPUs than
    ranks). Empty when ``VLLM_CPU_OMP_THREADS_BIND`` is already set or one rank serves."""
    if ranks == 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    per_rank = [cpus[r::ranks] or [cpus[r % len(cpus)]] for r in range(ranks)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, c)) for c in per_rank)}


# The offline client's threads (vLLM 0.32, ``vllm.v1.engine.core_client``): its output-socket reader and its
# engine-process monitor, both daemons.
CLIENT_THREADS = ("EngineCoreOutputQueueThread", "MPClientEngineMonitor")


def _client_threads() -> list[threading.Thread]:
    """The ``CLIENT_THREADS`` alive in this process, the calling thread excepted."""
    return [t for t in threading.enumerate()
            if t.name in CLIENT_THREADS and t.is_alive() and t is not threading.current_thread()]


def client_threads() -> list[str]:
    """Names of ``CLIENT_THREADS`` still alive in this process."""
    return [t.name for t in _client_threads()]


def shutdown_llm(llm, *, timeout: float = 30.0) -> None:
    """Stop ``llm``'s engine (engine-core process, workers, sockets) from the calling thread, and wait (up to
    ``timeout`` s each) for the client's threads to end.

    Every process that makes an ``LLM`` calls this before it exits (``served`` does). Left to the interpreter's
    exit, vLLM's finalizers stop the engine-core process first; the client's monitor thread (a daemon) then runs
    the client's clean-up while the interpreter finalizes, and a torch tensor freed on that thread takes the GIL
    after finalization: the thread is unwound through a ``noexcept`` destructor and the process aborts
    ("terminate called without an active exception", exit status -6) after its work is done. vLLM's own
    ``shutdown`` only signals its output-socket thread to stop; the thread ends on its own time, possibly while
    the interpreter finalizes, hence the join. Idempotent."""
    llm.llm_engine.engine_core.shutdown()
    for t in _client_threads():
        t.join(timeout)


@contextlib.contextmanager
def served(model: str, *, max_model_len: int | None, dtype: str | None, **engine):
    """``make_llm(...)`` for the ``with`` block; ``shutdown_llm`` on the way out."""
    llm = make_llm(model, max_model_len=max_model_len, dtype=dtype, **engine)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def vllm_perplexity(model: str, text: list[str], *, context: int, max_windows: int | None,
                    dtype: str | None) -> dict:
    from transformers import AutoTokenizer

    from .config import DarConfig

    cfg = DarConfig.from_model_dir(model) if os.path.isdir(model) else None
    if cfg is not None and cfg.budget is not None:
        raise ValueError("token budgets evict at the end of a prompt, and vLLM scores a window as one prompt (every "
                         "position present): score the continuation with --engine hf --prefix P")
    windows = token_windows(AutoTokenizer.from_pretrained(model), text, context=context, max_windows=max_windows)
    with served(model, max_model_len=context + 1, dtype=dtype) as llm:
        return {**windows_perplexity(llm, windows), "engine": "vllm", "model": model, "context": context}


def windows_perplexity(llm, windows: list[list[int]]) -> dict:
    """Perplexity of ``llm`` over token ``windows``, each scored from its first token (every window must fit
    ``max_model_len - 1``)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, out in zip(windows, outs):
        for tok, lp in zip(w[1:], out.prompt_logprobs[1:]):  # position 0 has no prediction
            nll -= lp[tok].logprob
            count += 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def vllm_generate(model: str, prompt: str, *, max_tokens: int, dtype: str | None) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with served(model, max_model_len=len(ids) + max_tokens + 1, dtype=dtype) as llm:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)[0].outputs[0]
    return {"prompt_tokens": len(ids), "token_ids": list(out.token_ids), "text": out.text, "engine": "vllm"}
