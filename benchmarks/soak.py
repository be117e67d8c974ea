"""Soak: a bounded, seeded mix of concurrent requests against ``vllm serve`` of stock and of DAR, then checks that
the server let go of every KV block, still answers, and gives concurrent greedy requests the tokens they get alone.

Each engine is served in turn on 127.0.0.1 with the same settings (``serve.serve_command``: ``--dtype``,
``--max-model-len``, ``--max-num-batched-tokens 4096``, no prefix caching, ``--seed 0``) and
``VLLM_CPU_KVCACHE_SPACE=<--kv-gib>``; stock serves ``--stock``, dar serves ``--model`` (its config.json ``dar``
section makes the plugin serve it). ``--concurrency`` clients (aiohttp, raw ``/v1/completions`` so that a
disconnect is a real TCP close) send ``--requests`` requests, the same list to every engine (``--seed``):

    prompts   token ids cut from the held-out documentation files (``vllm_dar.data.split_files()[1]``): 80% short
              (4-64 tokens), 20% long (256 up to max-model-len - max_tokens)
    sampling  40% greedy (temperature 0), else temperature 0.8 / top_p 0.95 with a per-request seed; n = 2 or 3 for
              15% of the sampled ones; max_tokens 1-64; 20% carry stop strings
    streaming 60% stream; exactly 20% of all requests (rounded) are cancelled mid-stream (the client closes the
              connection after 1-4 chunks; these ask for >= 16 tokens and carry no stop string, so they are still running) and
              exactly 5% are aborted before their first token (closed 0-50 ms after sending)

Afterwards, per engine: once ``vllm:num_requests_running`` and ``..._waiting`` are 0, ``vllm:kv_cache_usage_perc``
from ``/metrics`` (``kv_usage_after``: must be 0), ``/health`` and one more completion (``alive``), then up to
``--greedy-checks`` completed greedy requests sent again one at a time: ``greedy_mismatches`` counts those whose
text differs from what the request got under load. Latency: end-to-end seconds of the requests that completed
(``p50_s``, ``p99_s``); the top level holds dar's p99 over stock's.

    python benchmarks/soak.py --json benchmarks/results/soak.json       # 500 requests, fp32: ~35 min here
                                                                        # (2 shared cores; 3-5 min per start-up)
    python benchmarks/soak.py --requests 40 --engines dar               # a smoke run

Bounded: ``--time-limit`` seconds per engine for the load (requests not started by then are not sent, and counted
in ``not_sent``), ``--request-timeout`` per request; every server runs in its own process group and is stopped on
exit. The exit status is 1 if any valid request failed, KV usage stayed above 0, a server died or a greedy output
differed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import urllib.request

import harness
import serve

STOPS = (["\n\n"], ["."], [":", "\n"], ["the"])


def prompt_pool(tokenizer_dir: str, tokens: int) -> list[int]:
    """``tokens`` token ids of held-out documentation text (one stream; prompts are slices of it)."""
    from transformers import AutoTokenizer

    from vllm_dar.data import split_files

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for path in split_files()[1]:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += tok(f.read(), add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return ids[:tokens]
    return ids


def make_requests(n: int, seed: int, pool: list[int], max_model_len: int) -> list[dict]:
    """The seeded request list (module docstring): each a /v1/completions body plus ``_mode`` (``full``,
    ``cancel`` after ``_chunks`` chunks, or ``abort`` after ``_delay`` s)."""
    rng = random.Random(seed)
    n_cancel, n_abort = round(0.2 * n), round(0.05 * n)  # exact shares: a per-request draw wanders (87 of 500)
    modes = ["cancel"] * n_cancel + ["abort"] * n_abort + ["full"] * (n - n_cancel - n_abort)
    rng.shuffle(modes)
    out = []
    for i, mode in enumerate(modes):
        max_tokens = rng.randint(16 if mode == "cancel" else 1, 64)  # a cancel must still be running to be cut
        longest = max_model_len - max_tokens
        length = rng.randint(4, 64) if rng.random() < 0.8 else rng.randint(min(256, longest), longest)
        start = rng.randrange(0, len(pool) - length)
        body = {"prompt": pool[start:start + length], "max_tokens": max_tokens}
        if rng.random() < 0.4:
            body["temperature"] = 0.0
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
            if rng.random() < 0.15:
                body["n"] = rng.choice((2, 3))
        if rng.random() < 0.2:
            body["stop"] = rng.choice(STOPS)
        body["stream"] = mode != "full" or rng.random() < 0.5
        if mode == "cancel":  # a stop string could end it before the cut: not a cancellation
            body.pop("stop", None)
        out.append({**body, "_id": i, "_mode": mode, "_chunks": rng.randint(1, 4), "_delay": rng.random() * 0.05})
    return out


def _body(req: dict, model: str) -> dict:
    return {"model": model, **{k: v for k, v in req.items() if not k.startswith("_")}}


async def send(session, url: str, model: str, req: dict, timeout: float) -> dict:
    """One request as its ``_mode`` says; returns {outcome, seconds, texts, finish} (texts per choice index)."""
    import aiohttp

    t0 = time.monotonic()
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    post = session.post(url, json=_body(req, model), timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        if req["_mode"] == "abort":  # close the connection before any token: while sending, or once headers came
            with contextlib.suppress(asyncio.TimeoutError):
                (await asyncio.wait_for(post, req["_delay"])).close()
            return {"outcome": "aborted", "seconds": time.monotonic() - t0}
        async with post as resp:
            if resp.status != 200:
                return {"outcome": "error", "status": resp.status, "detail": (await resp.text())[:300],
                        "seconds": time.monotonic() - t0}
            if not req["stream"]:
                for c in (await resp.json())["choices"]:
                    texts[c["index"]], finish[c["index"]] = c["text"], c["finish_reason"]
                return {"outcome": "completed", "seconds": time.monotonic() - t0, "texts": texts, "finish": finish}
            chunks = 0
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    finish[c["index"]] = c.get("finish_reason") or finish.get(c["index"])
                chunks += 1
                if req["_mode"] == "cancel" and chunks >= req["_chunks"]:
                    resp.close()  # a client disconnect: the server must abort the request and free its blocks
                    return {"outcome": "cancelled", "seconds": time.monotonic() - t0, "chunks": chunks}
            outcome = "completed" if len(finish) == req.get("n", 1) and all(finish.values()) else "error"
            return {"outcome": outcome, "seconds": time.monotonic() - t0, "texts": texts, "finish": finish}
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"outcome": "error", "detail": repr(e)[:300], "seconds": time.monotonic() - t0}


async def load(url: str, model: str, requests: list[dict], concurrency: int, time_limit: float,
               timeout: float) -> list[dict | None]:
    """Send ``requests`` with ``concurrency`` clients; a request not started within ``time_limit`` s is None."""
    import aiohttp

    results: list[dict | None] = [None] * len(requests)
    queue = list(reversed(range(len(requests))))
    deadline = time.monotonic() + time_limit

    async def client(session):
        while queue and time.monotonic() < deadline:
            i = queue.pop()
            results[i] = await send(session, url, model, requests[i], timeout)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return results


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return serve.parse_prometheus(r.read().decode(), set(serve.PROMETHEUS.values()))


def drained_metrics(port: int, wait: float = 60) -> dict[str, float]:
    """/metrics once no request is running or waiting (the server's view of the aborts), at most ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        m = metrics(port)
        busy = m.get(serve.PROMETHEUS["running"], 0) + m.get(serve.PROMETHEUS["waiting"], 0)
        if not busy or time.monotonic() > deadline:
            time.sleep(1.0)  # the last step's stats reach the logger after its outputs
            return metrics(port)
        time.sleep(0.5)


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``xs``, nearest rank; None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, int(-(-q * len(s) // 1)) - 1))], 3)


def greedy_checks(url: str, model: str, requests: list[dict], results: list, limit: int, timeout: float) -> dict:
    """Resend up to ``limit`` completed greedy requests one at a time, non-streaming; compare texts."""
    import aiohttp

    picked = [i for i, r in enumerate(results) if r and r["outcome"] == "completed"
              and requests[i].get("temperature") == 0.0][:limit]
    mismatches = []

    async def run():
        async with aiohttp.ClientSession() as session:
            for i in picked:
                alone = await send(session, url, model, {**requests[i], "stream": False, "_mode": "full"}, timeout)
                if alone.get("texts") != results[i]["texts"]:
                    mismatches.append({"id": i, "prompt_tokens": len(requests[i]["prompt"]),
                                       "under_load": results[i]["texts"], "alone": alone.get("texts")})

    asyncio.run(run())
    return {"greedy_checked": len(picked), "greedy_mismatches": len(mismatches),
            "greedy_mismatch_examples": mismatches[:5]}


def alive(port: int, model: str) -> bool:
    """/health answers and one short completion comes back."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10):
            pass
        body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4}).encode()
        rq = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                    {"Content-Type": "application/json"})
        with urllib.request.urlopen(rq, timeout=120) as r:
            return bool(json.load(r)["choices"])
    except OSError:
        return False


def summarize(requests: list[dict], results: list, wall_s: float) -> dict:
    done = [r for r in results if r]
    count = {k: sum(r["outcome"] == k for r in done) for k in ("completed", "cancelled", "aborted", "error")}
    lat = [r["seconds"] for r in done if r["outcome"] == "completed"]
    return {"sent": len(done), "not_sent": len(results) - len(done), "completed": count["completed"],
            "cancelled": count["cancelled"], "aborted_before_first_token": count["aborted"],
            "errors": count["error"], "error_examples": [r for r in done if r["outcome"] == "error"][:5],
            "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
            "load_wall_s": round(wall_s, 1)}


def run_engine(a: argparse.Namespace, engine: str, requests: list[dict]) -> dict:
    """Serve ``engine``, send the load, run the after-checks; the record (or ``error`` if the server failed)."""
    model = a.model if engine == "dar" else a.stock
    port = serve.free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(a.kv_gib), "HF_HUB_OFFLINE": "1"}
    cmd = serve.serve_command(model, engine, port, a.dtype, a.max_model_len) + (["--enforce-eager"] * a.eager)
    server = serve.Server(cmd, env, engine, port, a.startup_timeout)
    try:
        server.start()
        url = f"http://127.0.0.1:{port}/v1/completions"
        t0 = time.monotonic()
        results = asyncio.run(load(url, model, requests, a.concurrency, a.time_limit, a.request_timeout))
        record = summarize(requests, results, time.monotonic() - t0)
        m = drained_metrics(port)
        record.update(kv_usage_after=m.get(serve.PROMETHEUS["kv_usage"]),
                      running_after=m.get(serve.PROMETHEUS["running"]),
                      waiting_after=m.get(serve.PROMETHEUS["waiting"]),
                      preemptions=m.get(serve.PROMETHEUS["preemptions"]), alive=alive(port, model))
        record.update(greedy_checks(url, model, requests, results, a.greedy_checks, a.request_timeout))
        record.update(alive_after_checks=server.proc.poll() is None, startup_s=server.startup_s,
                      log=server.log_path)
        return record
    except serve.ServerError as e:
        return {"error": str(e)}
    finally:
        server.stop()


def failed(record: dict) -> bool:
    """What makes the run fail (exit status 1)."""
    return ("error" in record or record["errors"] or record["kv_usage_after"] != 0 or not record["alive"]
            or record["greedy_mismatches"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=harness.DAR_MODEL, help="the DAR checkpoint (engine dar)")
    ap.add_argument("--stock", default=os.path.join(harness.MODELS, "smollm2-135m"),
                    help="the full-attention checkpoint (engine stock)")
    ap.add_argument("--engines", default="stock,dar", help="stock, dar or both, in this order")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    ap.add_argument("--eager", action="store_true",
                    help="vllm serve --enforce-eager (no torch.compile: minutes less start-up, slower steps)")
    ap.add_argument("--greedy-checks", type=int, default=30, help="completed greedy requests resent alone")
    ap.add_argument("--time-limit", type=float, default=1800, help="seconds of load per engine")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write the result JSON to PATH (- or no PATH: stdout only)")
    a = ap.parse_args(argv)
    a.engine_list = [e.strip() for e in a.engines.split(",") if e.strip()]
    if not a.engine_list or any(e not in ("stock", "dar") for e in a.engine_list):
        ap.error(f"--engines {a.engines!r}: each must be stock or dar")
    if not 64 < a.max_model_len:
        ap.error(f"--max-model-len {a.max_model_len}: must be > 64")
    return a


def run(a: argparse.Namespace) -> dict:
    """The whole soak for ``a`` (parse_args); the result object."""
    pool = prompt_pool(a.stock, max(4 * a.max_model_len, 20000))
    requests = make_requests(a.requests, a.seed, pool, a.max_model_len)
    engines = {e: run_engine(a, e, requests) for e in a.engine_list}
    p99 = {e: r.get("p99_s") for e, r in engines.items()}
    ratio = round(p99["dar"] / p99["stock"], 3) if p99.get("dar") and p99.get("stock") else None
    settings = {k: getattr(a, k) for k in ("model", "stock", "requests", "concurrency", "seed", "max_model_len",
                                           "dtype", "kv_gib", "eager", "greedy_checks", "time_limit")}
    return {"settings": settings, "engines": engines, "p99_ratio_dar_to_stock": ratio}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = run(a)
    text = json.dumps(result, indent=2)
    if a.json and a.json != "-":
        harness.write_json(a.json, result)
    print(text)
    return 1 if any(failed(r) for r in result["engines"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
