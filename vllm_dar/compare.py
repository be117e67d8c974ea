"""``vllm-dar compare``: a stock model and its DAR conversion served side by side by stock vLLM.

Each model is served by ``vllm.LLM`` in its own fresh process (vLLM spawns workers, and one engine's memory and
settings never reach the other), both with the same ``VLLM_CPU_KVCACHE_SPACE``, dtype and ``max_model_len``; the
stock engine runs without any vLLM plugin (``VLLM_PLUGINS=""``), the DAR engine with every installed one. Per
engine, one after the other:

* ``kv_capacity_tokens``: vLLM's own KV cache capacity, the figure it logs at start-up
  (``cache_config.kv_cache_size_tokens``; for a DAR model the plugin's per-request admission bound at
  ``max_model_len``);
* ``answer``: the greedy reply to one chat prompt, a held-out passage of Python's documentation (longer than the
  DAR model's narrowest windows) and a question about it;
* ``decode_tok_s``: ``batch`` held-out prompts of ``prompt_tokens`` tokens decoding ``decode_tokens`` greedy tokens
  together: batch / time per decode step, the step time from vLLM's per-request metrics of the request that
  finished prefill last (its decode steps are whole-batch steps, as in ``benchmarks/dtype_speed.py``);
* ``perplexity``: over ``eval_windows`` held-out windows of ``context`` tokens, from vLLM's prompt
  log-probabilities (``vllm_engine.windows_perplexity``, what ``vllm-dar eval --engine vllm`` computes).

Both engines serve ``dtype`` (default bfloat16, vLLM's fast CPU dtype): the DAR checkpoint keeps its source's
weights (the fp32 copy), which bfloat16 rounds to exactly the stock bfloat16 checkpoint's. Both run eagerly
(``enforce_eager``) unless ``compile``: vLLM's torch.compile warm-up takes minutes per engine on a small CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass

from .config import DarConfig

PASSAGE_FILE = "library/heapq.rst.txt"  # under data.DOC_SOURCES; in the held-out split, never calibrated on
PASSAGE = ("This module provides", ".. function:: heappushpop")  # from the first string up to the second
QUESTION = "What does heappop do if the heap is empty?"


@dataclass(frozen=True)
class CompareSettings:
    """What both engines run; the CLI's defaults are these."""

    dtype: str = "bfloat16"  # served dtype of both engines
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE of both engines (whole GiB, as vLLM reads it)
    max_model_len: int | None = None  # of both engines; None: vLLM's default, the model's maximum context
    context: int = 2048  # perplexity window
    eval_windows: int = 2  # perplexity windows
    batch: int = 4  # decode speed: prompts decoding together
    prompt_tokens: int = 512  # decode speed: tokens per prompt
    decode_tokens: int = 32  # decode speed: greedy tokens per prompt
    answer_tokens: int = 48  # reply to the chat prompt
    compile: bool = False  # vLLM's torch.compile (its default); off: enforce_eager, minutes less per engine start

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"--dtype: {self.dtype!r} is not one of bfloat16, float32, float16")
        for name in ("kv_cache_gib", "context", "eval_windows", "batch", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 1")
        if self.decode_tokens < 2:
            raise ValueError(f"--decode-tokens: {self.decode_tokens} must be >= 2 (a step time needs two tokens)")
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens: {self.prompt_tokens} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len: {self.max_model_len} must be >= 2")


def compare(stock: str, dar: str, *, settings: CompareSettings = CompareSettings(), log_dir: str | None = None,
            progress: bool = True) -> dict:
    """Serve ``stock`` (no ``dar`` section) and ``dar`` (a DAR conversion of it) with vLLM, one after the other,
    and measure both (see the module docstring). ``log_dir``: where each engine's log goes (default: a temporary
    directory, kept only when an engine fails). Returns both engines' measurements and the ratios."""
    if DarConfig.from_model_dir(stock) is not None:
        raise ValueError(f"STOCK_DIR: {stock} has a dar section; pass the unconverted model")
    cfg = DarConfig.from_model_dir(dar)
    if cfg is None:
        raise ValueError(f"DAR_DIR: {dar} has no dar section; convert it first (vllm-dar convert)")
    if cfg.budget is not None:  # its perplexity row, prompts scored whole, would hide the eviction
        raise ValueError(f"DAR_DIR: {dar} has token budgets, which evict at the end of a prompt, and compare scores "
                         "perplexity over whole prompts; compare it without them (vllm-dar budget on a copy: "
                         "--clear) and score the budgets with vllm-dar eval --engine hf --prefix P")
    passage_prompt()  # fail on missing documentation text before starting an engine
    logs = log_dir or tempfile.mkdtemp(prefix="vllm-dar-compare-")
    runs = {name: _spawn(name, model, settings, logs, progress=progress)  # raises, logs kept, if one fails
            for name, model in (("stock", stock), ("dar", dar))}
    if log_dir is None:
        shutil.rmtree(logs)
    s, d = runs["stock"], runs["dar"]
    return {
        "stock": s, "dar": d, "settings": asdict(settings), "question": QUESTION,
        "dar_config": cfg.describe(),
        "dar_kv_fraction": round(cfg.kv_fraction(s["max_model_len"]), 4),  # the layout's, at max_model_len
        "kv_capacity_ratio": d["kv_capacity_tokens"] / s["kv_capacity_tokens"],
        "perplexity_delta": d["perplexity"] / s["perplexity"] - 1,
        "decode_speedup": d["decode_tok_s"] / s["decode_tok_s"],
    }


def passage_prompt() -> str:
    """The chat prompt both engines answer: a passage of the held-out heapq documentation and ``QUESTION``."""
    from .data import DOC_SOURCES

    path = os.path.join(DOC_SOURCES, PASSAGE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: install Debian's python3.11-doc (scripts/setup.sh does)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(PASSAGE[0]), text.index(PASSAGE[1])
    return f"{text[start:end].strip()}\n\n{QUESTION}"


def _spawn(name: str, model: str, settings: CompareSettings, logs: str, *, progress: bool) -> dict:
    """Run ``measure`` for one engine in a fresh interpreter; its result comes back through a file."""
    job, out, log = (os.path.join(logs, f"{name}.{ext}") for ext in ("job.json", "out.json", "log"))
    with open(job, "w") as f:
        json.dump({"model": model, "settings": asdict(settings)}, f)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib)}
    if name == "stock":
        env["VLLM_PLUGINS"] = ""  # stock vLLM: no plugin loaded at all
    else:
        env.pop("VLLM_PLUGINS", None)  # every installed plugin, vllm-dar's included
    if progress:
        print(f"{name}: serving {model} with vLLM (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "vllm_dar.compare", job, out], env=env, stdout=f,
                              stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"the {name} engine failed (exit {proc.returncode}; log {log}):\n{tail}")
    with open(out) as f:
        return json.load(f)


def measure(model: str, settings: CompareSettings) -> dict:
    """One engine's measurements (runs in the engine's own process)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams, TokensPrompt

    from .data import split_files, token_windows
    from .vllm_engine import served, windows_perplexity

    s = settings
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    held_out = split_files()[1]
    chat = tok.apply_chat_template([{"role": "user", "content": passage_prompt()}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(chat, add_special_tokens=False)["input_ids"]  # the template holds the special tokens
    # disable_log_stats=False: RequestOutput.metrics (the decode step times) is None without it.
    with served(model, max_model_len=s.max_model_len, dtype=s.dtype, enforce_eager=not s.compile,
                disable_log_stats=False) as llm:
        # The same for both engines (one config): a DAR model's logged capacity is its per-request bound at it.
        max_model_len = llm.llm_engine.model_config.max_model_len
        longest = max(s.context + 1, len(ids) + s.answer_tokens, s.prompt_tokens + s.decode_tokens)
        if longest > max_model_len:
            raise ValueError(f"--max-model-len: {max_model_len} is shorter than the longest request, "
                             f"{longest} tokens")
        capacity = llm.llm_engine.vllm_config.cache_config.kv_cache_size_tokens
        seconds = {"start": time.perf_counter() - t0}

        reply = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                             SamplingParams(temperature=0.0, max_tokens=s.answer_tokens),
                             use_tqdm=False)[0].outputs[0]
        seconds["answer"] = time.perf_counter() - t0 - sum(seconds.values())

        # Decode prompts from the far end of the held-out text: no prefix of a perplexity window.
        prompts = token_windows(tok, held_out[::-1], context=s.prompt_tokens, max_windows=s.batch)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=s.decode_tokens, ignore_eos=True),
                            use_tqdm=False)
        last = max(outs, key=lambda o: o.metrics.first_token_ts).metrics  # its decode steps hold the whole batch
        step_s = (last.last_token_ts - last.first_token_ts) / (s.decode_tokens - 1)
        seconds["decode"] = time.perf_counter() - t0 - sum(seconds.values())

        windows = token_windows(tok, held_out, context=s.context, max_windows=s.eval_windows)
        ppl = windows_perplexity(llm, windows)
        seconds["perplexity"] = time.perf_counter() - t0 - sum(seconds.values())
        return {"model": model, "max_model_len": max_model_len, "kv_capacity_tokens": capacity,
                "answer": reply.text, "prompt_tokens": len(ids),
                "decode_tok_s": len(prompts) / step_s, "decode_step_ms": 1000 * step_s,
                **ppl, "served_dtype": str(llm.llm_engine.model_config.dtype),
                "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def render(r: dict, width: int = 110) -> str:
    """The one-screen summary of a ``compare`` result."""
    s, st, d = r["settings"], r["stock"], r["dar"]
    rows = [
        ("", "stock", "DAR", "DAR vs stock"),
        ("KV cache capacity, tokens (vLLM's log)", f"{st['kv_capacity_tokens']:,}", f"{d['kv_capacity_tokens']:,}",
         f"{r['kv_capacity_ratio']:.2f}x"),
        (f"perplexity ({s['eval_windows']} x {s['context']} held-out tokens)", f"{st['perplexity']:.3f}",
         f"{d['perplexity']:.3f}", f"{r['perplexity_delta']:+.1%}"),
        (f"decode tokens/s ({s['batch']} x {s['prompt_tokens']}-token prompts)", f"{st['decode_tok_s']:.1f}",
         f"{d['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}x"),
    ]
    engines = (f"vLLM, both engines {s['dtype']}, {'torch.compile' if s['compile'] else 'eager'}, "
               f"VLLM_CPU_KVCACHE_SPACE={s['kv_cache_gib']} GiB, max_model_len {st['max_model_len']}")
    dar = (f"{d['model']} ({r['dar_config']}; {r['dar_kv_fraction']:.1%} of the stock KV bytes at "
           f"{st['max_model_len']} tokens)")
    lines = [engines, f"stock: {st['model']}", *textwrap.wrap(f"DAR:   {dar}", width, subsequent_indent=" " * 7),
             ""]
    lines += [f"{a:<52}{b:>12}{c:>12}{e:>15}" for a, b, c, e in rows]
    lines += ["", f"Prompt: {st['prompt_tokens']} tokens of heapq documentation, then: {r['question']}"]
    for name, x in (("stock", st), ("DAR", d)):
        lines += textwrap.wrap(" ".join(x["answer"].split()), width, initial_indent=f"{name + ':':<7}",
                               subsequent_indent=" " * 7) or [f"{name}: (empty)"]
    return "\n".join(lines)


if __name__ == "__main__":  # one engine's process: python -m vllm_dar.compare JOB.json OUT.json
    with open(sys.argv[1]) as f:
        _job = json.load(f)
    _result = measure(_job["model"], CompareSettings(**_job["settings"]))
    with open(sys.argv[2], "w") as f:
        json.dump(_result, f)
