"""Long-context retrieval through the real vLLM engine: a pass key planted in real text, recalled greedily at the end.

The task (``prompts``): filler is Debian's python3.11-doc sources (held-out files, ``vllm_dar.data``), cut to the
context; at ``depth`` (0 = right after the start, 1 = just before the question) the passkey test's needle is
planted, ``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` (five random digits, the first not 0), and
the prompt ends with the question ``What is the pass key? The pass key is N``, given up to the key's first digit.
The model must continue with the key's other four digits, greedy, 8 new tokens. ``accuracy``: all four right;
``digits``: the share of the four digits right in place (partial credit).

Why this shape: SmolLM2-135M is weak at long range. Asked without the first digit, or for a bare
``SECRET_CODE = `` line, it answered with prose from the filler ("a key that is used to ...") in a third to all
of the prompts at 4K-8K tokens (tried by hand, 2-3 prompts a cell, fp32). Giving the first digit puts the model
into copying at once; the four digits it must produce are random and appear only in the needle, so a row scores
only if its caches still let the last tokens find the needle. The DAR budget rows select distant tokens with the
queries of the prompt's last ``observation_window`` tokens, which hold the question: the task rewards a selection
that keeps the needle, as a user's question about a document would.

Rows (``--rows``; each in a fresh engine process, all with the same prompts): ``full`` (``--stock``), ``dar``
(``--dar``), ``pyramid`` and ``uniform`` (``--dar`` with token budgets ``--budget`` of each prompt's distant
tokens, PyramidKV's schedule or the same share in every layer, set as ``vllm-dar budget`` does on a hard-linked
copy), and ``window`` (``--dar`` keeping no distant token: its sinks and windows only, StreamingLLM-like). The
pyramid and uniform rows hold the same KV bytes per request; ``window`` holds fewer. ``kv_bytes`` per row and
context: what the byte model (``vllm_dar.config``) says a request holds right after its prompt, in the engines'
dtype, and its share of stock's.

Output: a table of accuracy per row and context (mean over depths), the full model's cells first (the task is
fair only where the full model is reliable), ``--json`` for everything (every prompt's answer), ``--save`` writes
``benchmarks/results/longcontext.json`` and ``longcontext.png`` (accuracy heat maps, context x depth, one per row).

Run (fp32: this project's CPUs lack native bf16; about 5 minutes per row for the default grid on 2 cores, longer
with 8K contexts, alone)::

    python benchmarks/longcontext.py [--save] [--json] [--rows full,dar,pyramid,uniform,window]
        [--contexts 1024,2048,4096] [--depths 0.1,0.3,0.5,0.7,0.9] [--trials 2] [--budget 0.1]
        [--dtype float32] [--kv-gib 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import capacity
import harness
import throughput

ROWS = ("full", "dar", "pyramid", "uniform", "window")
BUDGET_ROWS = {"pyramid": "pyramid", "uniform": "uniform", "window": "uniform"}  # row -> budget schedule
NEEDLE = "\n\nThe pass key is {code}. Remember it. {code} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is {first}"
NEW_TOKENS = 8


def filler_tokens(tokenizer, tokens: int) -> list[int]:
    """At least ``tokens`` tokens of held-out documentation (files in order, an EOS between files)."""
    from vllm_dar import data

    stream: list[int] = []
    for path in data.split_files()[1]:
        with open(path, encoding="utf-8", errors="replace") as f:
            stream += tokenizer(f.read(), add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
        if len(stream) >= tokens:
            return stream
    raise SystemExit(f"the held-out documentation has {len(stream)} tokens, fewer than the {tokens} needed")


def prompts(tokenizer, contexts: list[int], depths: list[float], trials: int, seed: int) -> list[dict]:
    """Every (context, depth, trial) prompt: token ids of exactly ``context`` tokens, the code and where the
    needle starts. Deterministic in ``seed``; each prompt's filler starts at a random place in the text."""
    rng = random.Random(seed)
    stream = filler_tokens(tokenizer, 4 * max(contexts))
    out = []
    for context in contexts:
        for depth in depths:
            for trial in range(trials):
                code = str(rng.randrange(10000, 100000))
                needle = tokenizer(NEEDLE.format(code=code), add_special_tokens=False)["input_ids"]
                question = tokenizer(QUESTION.format(first=code[0]), add_special_tokens=False)["input_ids"]
                fill = context - len(needle) - len(question)
                start = rng.randrange(0, len(stream) - fill)
                text = stream[start:start + fill]
                at = round(depth * fill)
                ids = text[:at] + needle + text[at:] + question
                assert len(ids) == context
                out.append({"context": context, "depth": depth, "trial": trial, "code": code, "needle_at": at,
                            "ids": ids})
    return out


def score(code: str, answer: str) -> tuple[bool, float]:
    """(all four digits after the given first one right, share of them right in place)."""
    digits = "".join(c for c in answer if c.isdigit())[:4]
    right = sum(a == b for a, b in zip(digits, code[1:]))
    return right == 4, right / 4


def worker(args: argparse.Namespace) -> dict:
    """One engine (runs in the subprocess): greedy answers to every prompt of ``--prompts``."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    from vllm import LLM, SamplingParams, TokensPrompt

    from vllm_dar.vllm_engine import shutdown_llm

    with open(args.prompts) as f:
        items = json.load(f)
    llm = LLM(model=args.worker, dtype=args.dtype, max_model_len=max(p["context"] for p in items) + 16,
              enable_prefix_caching=False, seed=0)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in items],
                            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    return {"answers": [o.outputs[0].text for o in outs]}


def kv_bytes(row: str, model: str, contexts: list[int], dtype: str) -> dict:
    """Per context: the bytes one request of ``row`` holds right after its prompt (``throughput``'s, from the
    byte model, evictions included) and their share of stock's."""
    engine = "stock" if row == "full" else "dar"
    out = {}
    for c in contexts:
        held = throughput.kv_bytes_per_request(engine, model, c, dtype)
        out[str(c)] = {"bytes": held, "fraction_of_stock": held / throughput.kv_bytes_per_request("stock", model, c,
                                                                                                    dtype)}
    return out


def cells(items: list[dict], answers: list[str]) -> list[dict]:
    """Accuracy and partial credit per (context, depth), with every answer."""
    by = {}
    for p, a in zip(items, answers):
        ok, part = score(p["code"], a)
        by.setdefault((p["context"], p["depth"]), []).append((ok, part, p["code"], a))
    return [{"context": c, "depth": d, "accuracy": sum(x[0] for x in v) / len(v),
             "digits": sum(x[1] for x in v) / len(v), "answers": [{"code": x[2], "answer": x[3]} for x in v]}
            for (c, d), v in sorted(by.items())]


def table(result: dict) -> str:
    rows_ = [r for r in ROWS if r in result["rows"]]
    contexts = result["settings"]["contexts"]
    lines = []
    full = result["rows"].get("full")
    if full:
        depths = result["settings"]["depths"]
        grid = {(c["context"], c["depth"]): c for c in full["cells"]}
        lines.append(harness.markdown_table(
            ["full model: accuracy (digits)", *(f"depth {d}" for d in depths)],
            [[f"{c} tokens", *(f"{grid[c, d]['accuracy']:.0%} ({grid[c, d]['digits']:.0%})" for d in depths)]
             for c in contexts]))
        lines.append("")
    header = ["row", *(f"{c}: accuracy / digits / KV bytes" for c in contexts)]
    body = []
    for name in rows_:
        r = result["rows"][name]
        per = []
        for c in contexts:
            cs = [x for x in r["cells"] if x["context"] == c]
            acc = sum(x["accuracy"] for x in cs) / len(cs)
            dig = sum(x["digits"] for x in cs) / len(cs)
            per.append(f"{acc:.0%} / {dig:.0%} / {r['kv_bytes'][str(c)]['fraction_of_stock']:.1%}")
        body.append([name, *per])
    lines.append(harness.markdown_table(header, body))
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    """Accuracy heat maps (context x depth), one per row, as a PNG; False when matplotlib is missing."""
    plt = harness.pyplot()
    if plt is None:
        return False
    names = [r for r in ROWS if r in result["rows"]]
    contexts, depths = result["settings"]["contexts"], result["settings"]["depths"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1, 0.5 * len(contexts) + 1.8),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = {(c["context"], c["depth"]): c["accuracy"] for c in result["rows"][name]["cells"]}
        values = [[grid[c, d] for d in depths] for c in contexts]
        ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
        ax.set_yticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("context (tokens)", fontsize=8)
    s = result["settings"]
    fig.suptitle(f"pass key recall, greedy, {s['dtype']}, {s['trials']} prompts per cell, budgets {s['budget']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(ap)
    harness.add_worker_args(ap)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--contexts", type=harness.int_list, default=[1024, 2048, 4096],
                    help="prompt lengths in tokens (SmolLM2: at most 8176)")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths in [0, 1]")
    ap.add_argument("--trials", type=int, default=2, help="prompts per cell (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", default="0.1", metavar="F",
                    help="pyramid/uniform rows: distant prompt tokens kept (vllm-dar budget --token-budget)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE of each engine (default 2)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/longcontext.json and .png")
    args = ap.parse_args()
    if args.worker:
        harness.write_json(args.out, worker(args))
        return 0
    rows = args.rows.split(",")
    if bad := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {bad}; of {', '.join(ROWS)}")
    depths = [float(d) for d in args.depths.split(",")]
    if any(not 0 <= d <= 1 for d in depths):
        ap.error("--depths must lie in [0, 1]")
    from transformers import AutoTokenizer

    items = prompts(AutoTokenizer.from_pretrained(args.stock), args.contexts, depths, args.trials, args.seed)
    result = {"settings": {"stock": args.stock, "dar": args.dar, "contexts": args.contexts, "depths": depths,
                           "trials": args.trials, "seed": args.seed, "budget": args.budget, "dtype": args.dtype,
                           "kv_gib": args.kv_gib, "needle": NEEDLE, "question": QUESTION,
                           "new_tokens": NEW_TOKENS, "load_before": os.getloadavg()[0]},
              "rows": {}}
    with tempfile.TemporaryDirectory(prefix="vllm-dar-longcontext-") as tmp:
        path = os.path.join(tmp, "prompts.json")
        harness.write_json(path, items, indent=None)
        for name in rows:
            model = args.stock if name == "full" else args.dar
            if name in BUDGET_ROWS:
                folder = os.path.join(tmp, name)
                os.mkdir(folder)
                model = capacity.budget_copy(args.dar, folder, "0" if name == "window" else args.budget,
                                             BUDGET_ROWS[name])
            argv = ["--worker", model, "--prompts", path, "--dtype", args.dtype, "--kv-gib", str(args.kv_gib)]
            answers = harness.run_worker(__file__, argv, env=harness.dar_engine_env(None),
                                         show_output=not args.json)[0]["answers"]
            result["rows"][name] = {"kv_bytes": kv_bytes(name, model, args.contexts, args.dtype),
                                    "cells": cells(items, answers)}
            if not args.json:
                print(table(result), flush=True)
    if args.save:
        harness.write_json(os.path.join(harness.RESULTS, "longcontext.json"), result)
        plot(result, os.path.join(harness.RESULTS, "longcontext.png"))
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
