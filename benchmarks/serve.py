"""vLLM's own serving benchmark (``vllm bench serve``) against ``vllm serve`` of stock, stock with an FP8 KV cache
and DAR, on workloads where stock's KV cache is the limit.

Workloads (``--workload NAME``, repeatable or comma-separated; random token prompts, ``--ignore-eos``)::

    decode-heavy   64 requests x 1024 prompt / 1024 output tokens   fixed rate 0.1 req/s
    prompt-heavy   32 requests x 4096 prompt /  256 output tokens   fixed rate 0.05 req/s
    quick          16 requests x  512 prompt /   64 output tokens   all at once only (the old default run)
    N:IN:OUT       N requests x IN prompt / OUT output tokens        all at once only (e.g. 4:64:16)

Each workload runs all at once (request rate inf) and, where it has one, at a fixed request rate (Poisson arrivals,
seeded, so every engine sees the same arrival times); ``--request-rate R`` replaces every workload's fixed rate
(``inf``: all at once only).

Why these are KV-bound. ``VLLM_CPU_KVCACHE_SPACE`` is read by vLLM 0.32's CPU platform as a whole number of GiB
(``int()``), so 1 GiB, the smallest, is the default ``--kv-gib``, the same for every engine. SmolLM2-135M caches
30 layers x (K + V) x 3 KV heads x 64 = 11,520 elements per token (``vllm_dar.config.ModelShape``): 23,040 bytes
in bf16, so 1 GiB holds 46,592 tokens in vLLM's 128-token blocks (23,296 in fp32, 93,184 with FP8). A
decode-heavy request grows to 2,048 tokens: stock bf16 holds 22 of the 64 at full length (FP8 45), admits more
while they are short and then preempts them (recomputing their prompts) as they grow. A prompt-heavy request
needs 4,352 tokens: stock holds 10 of the 32 (FP8 21). A DAR layout caches a fraction of stock's bytes per token
(``DarConfig.kv_bytes_per_token``: about a quarter for the recommended recipe at these lengths), so it can hold
most or all of them at once: more requests per decode step, fewer preemptions. With ``--dtype float32`` every
engine holds half as many tokens (FP8's cache stays 1 byte per element). (The server log's "CPU KV cache size: N
tokens" is vLLM's maximum concurrency at ``--max-model-len`` times that length, not the blocks' token capacity.)

Engines (``--engines``, default ``stock,stock-fp8,dar``), each served in turn on 127.0.0.1 with the same settings::

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=<--kv-gib> vllm serve MODEL --host 127.0.0.1 --port P \\
        --dtype <--dtype> --max-model-len <longest workload IN+OUT, +64> --max-num-batched-tokens 4096 \\
        --no-enable-prefix-caching --seed 0 --disable-access-log-for-endpoints /health,/metrics \\
        [--kv-cache-dtype fp8]

(stock and stock-fp8 serve ``--stock``; dar serves ``--dar``, whose config.json ``dar`` section makes our plugin
serve it, with ``VLLM_DAR_OPS`` from ``--dar-ops`` or the environment). vLLM 0.32's CPU attention backend supports
an FP8 KV cache on x86 with AVX-512 or AMX only (``_get_attn_isa`` in ``vllm/v1/attention/backends/cpu_attn.py``;
the head size, 64, must be a multiple of 32): on other CPUs stock-fp8 is skipped with a message and the rest runs.
``--dtype`` defaults to bfloat16 (vLLM's default serving dtype for these checkpoints); ``--dtype float32`` is the
old script's setting, and the one to use on a CPU without native bf16 (AVX2 only), where bf16 matmuls are
emulated and the bf16 run's prefills are far slower (README, "vLLM"). For each workload and rate, once ``/health`` answers::

    HF_HUB_OFFLINE=1 vllm bench serve --backend vllm --base-url http://127.0.0.1:P --model MODEL \\
        --dataset-name random --random-input-len IN --random-output-len OUT --num-prompts N --request-rate R \\
        --ignore-eos --seed 0 --temperature 0 --num-warmups 2 --percentile-metrics ttft,tpot,itl,e2el \\
        --metric-percentiles 50,99 --save-result --result-dir <--out-dir> --result-filename WORKLOAD-R-ENGINE.json

Figures: vLLM's own (output and total tokens/s, requests/s, TTFT, TPOT, ITL and end-to-end latency, median and
p99; the client's peak concurrent requests), from the result JSON; and the server's own, from its Prometheus
``/metrics`` polled every ``--metrics-interval`` s by a background thread during the client's run, warm-ups
included: the peak of ``vllm:num_requests_running`` (requests in the engine's batches), of
``vllm:num_requests_waiting`` and of ``vllm:kv_cache_usage_perc``, and the rise of ``vllm:num_preemptions_total``
(names from ``vllm/v1/metrics/loggers.py``). ``<--out-dir>/summary.json`` holds them with every engine's ratio to
stock (same workload and rate); ``summary.png`` plots output tokens/s and median TPOT per engine and run; a table
goes to stdout (``--json``: the summary JSON instead). Server logs and the client's output go to ``/tmp``, named
on stderr.

Bounded: every server and client runs in its own process group, stopped (SIGTERM, SIGKILL after 60 s) when its
runs end, on error, on Ctrl-C or SIGTERM; a client run over ``--timeout`` s is killed, recorded as failed and its
server restarted for the next run; a server that does not start fails that engine's runs, not the others'. The
exit status is 1 if any run failed. Localhost only: servers listen on 127.0.0.1 and Hugging Face is offline.

Run (all defaults: 3 engines x 2 workloads x 2 rates, on the 2-core machine an estimated 3-5 hours, from the
README's fp32 step times, not measured: decode-heavy 15-25 min per run, prompt-heavy 10-35 min, the DAR recipe's
slower prefill the longest; plus a 3-7 min start-up per engine)::

    python benchmarks/serve.py [--dar DIR] [--workload decode-heavy,prompt-heavy] [--engines stock,stock-fp8,dar]

A smoke run (about 15 min on the loaded 2-core machine, nearly all of it the two start-ups)::

    python benchmarks/serve.py --workload 4:64:16 --request-rate 2 --engines stock,dar --out-dir /tmp/serve-smoke

The old default run, fp32: ``python benchmarks/serve.py --workload quick --engines stock,dar --dtype float32
--kv-gib 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Self

import harness

from vllm_dar import envs

OUT_DIR = os.path.join(harness.RESULTS, "serve")
ENGINES = ("stock", "stock-fp8", "dar")
COLORS = {"stock": "tab:blue", "stock-fp8": "tab:orange", "dar": "tab:green"}  # as throughput.py's plot
GRACE_S = 60  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class Workload:
    """``num_prompts`` random prompts of ``input_len`` tokens, each generating ``output_len`` tokens; run all at
    once and, unless ``request_rate`` is None, at that fixed rate (requests/s)."""

    name: str
    num_prompts: int
    input_len: int
    output_len: int
    request_rate: float | None = None


WORKLOADS = {w.name: w for w in (
    Workload("decode-heavy", 64, 1024, 1024, 0.1),
    Workload("prompt-heavy", 32, 4096, 256, 0.05),
    Workload("quick", 16, 512, 64),
)}

# vLLM bench serve's result keys kept per run (with --percentile-metrics ttft,tpot,itl,e2el
# --metric-percentiles 50,99), then the server's own from /metrics; (key, label) in table order.
CLIENT_METRICS = (
    ("output_throughput", "output tokens/s"), ("total_token_throughput", "total tokens/s"),
    ("request_throughput", "requests/s"),
    ("median_ttft_ms", "median TTFT ms"), ("p99_ttft_ms", "p99 TTFT ms"),
    ("median_tpot_ms", "median TPOT ms"), ("p99_tpot_ms", "p99 TPOT ms"),
    ("median_itl_ms", "median ITL ms"), ("p99_itl_ms", "p99 ITL ms"),
    ("median_e2el_ms", "median E2E latency ms"), ("p99_e2el_ms", "p99 E2E latency ms"),
    ("duration", "duration s"), ("completed", "completed"), ("failed", "failed"),
    ("max_concurrent_requests", "client peak concurrent"),
)
SERVER_METRICS = (
    ("peak_running", "peak running requests"), ("peak_waiting", "peak waiting requests"),
    ("peak_kv_cache_usage", "peak KV cache usage"), ("preemptions", "preemptions"),
)
PROMETHEUS = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
              "kv_usage": "vllm:kv_cache_usage_perc", "preemptions": "vllm:num_preemptions_total"}


class ServerError(RuntimeError):
    """A server that exited or never answered ``/health``."""


# ---------------------------------------------------------------- arguments (pure)

def parse_workloads(texts: list[str]) -> list[Workload]:
    """``--workload`` values (each a name of ``WORKLOADS`` or ``N:IN:OUT``, comma-separated, repeatable) in
    order, duplicates dropped."""
    out: list[Workload] = []
    for text in texts:
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            if item in WORKLOADS:
                w = WORKLOADS[item]
            else:
                parts = item.split(":")
                if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                    raise SystemExit(f"--workload {item!r}: not one of {', '.join(WORKLOADS)} nor N:IN:OUT "
                                     "(three positive integers, e.g. 4:64:16)")
                n, i, o = map(int, parts)
                w = Workload(f"{n}x{i}-{o}", n, i, o)
            if w not in out:
                out.append(w)
    if not out:
        raise SystemExit("--workload: no workload given")
    return out


def parse_engines(text: str) -> list[str]:
    """``--engines``: a comma-separated subset of ``ENGINES``, in the order given."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise SystemExit(f"--engines {text!r}: each must be one of {', '.join(ENGINES)}")
    return list(dict.fromkeys(names))


def parse_rate(text: str) -> float:
    """``--request-rate``: requests/s > 0, or ``inf``."""
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number nor inf")
    return rate


def rate_label(rate: float) -> str:
    """``inf`` or the rate as ``%g`` (file names and the summary: JSON has no infinity)."""
    return "inf" if rate == float("inf") else f"{rate:g}"


def run_plan(workloads: list[Workload], request_rate: float | None) -> list[tuple[Workload, float]]:
    """(workload, rate) in run order: each workload all at once, then at ``request_rate`` if given, else at
    its own fixed rate if it has one."""
    plan = []
    for w in workloads:
        fixed = request_rate if request_rate is not None else w.request_rate
        plan += [(w, r) for r in dict.fromkeys([float("inf")] + ([fixed] if fixed is not None else []))]
    return plan


# ---------------------------------------------------------------- the server's Prometheus metrics

def parse_prometheus(text: str, names: set[str] | None = None) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value summed over its label sets} (one engine: its value),
    for ``names`` only when given. Comment lines are skipped; a sample is ``name{labels} value``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        if names is not None and name not in names:
            continue
        fields = rest.split()
        if fields:
            out[name] = out.get(name, 0.0) + float(fields[0])
    return out


def metrics_summary(scrapes: list[dict[str, float]], before: dict[str, float] | None,
                    after: dict[str, float] | None) -> dict:
    """The server figures of one run from its ``/metrics`` scrapes: peaks over every scrape, preemptions as the
    counter's rise from ``before`` to ``after`` (None when either scrape failed)."""
    def peak(key: str) -> float | None:
        values = [s[PROMETHEUS[key]] for s in scrapes if PROMETHEUS[key] in s]
        return max(values) if values else None

    name = PROMETHEUS["preemptions"]
    rise = after[name] - before[name] if before and after and name in before and name in after else None
    return {"peak_running": peak("running"), "peak_waiting": peak("waiting"),
            "peak_kv_cache_usage": peak("kv_usage"), "preemptions": rise, "metrics_scrapes": len(scrapes)}


class MetricsPoller:
    """Scrapes ``url`` (a server's ``/metrics``) once on entry, every ``interval`` s in a background thread, and
    once on exit; ``result()`` is ``metrics_summary`` of them. Failed scrapes are counted, not raised."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.scrapes: list[dict[str, float]] = []
        self.failed = 0
        self.before = self.after = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(self.url, timeout=max(2.0, self.interval)) as r:
                sample = parse_prometheus(r.read().decode(), set(PROMETHEUS.values()))
        except OSError:
            self.failed += 1
            return None
        self.scrapes.append(sample)
        return sample

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.scrape()

    def __enter__(self) -> Self:
        self.before = self.scrape()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            time.sleep(min(1.0, 2 * self.interval))  # the last step's stats reach the logger after its outputs
            self.after = self.scrape()

    def result(self) -> dict:
        return {**metrics_summary(self.scrapes, self.before, self.after), "failed_scrapes": self.failed}


# ---------------------------------------------------------------- processes

def vllm_command() -> list[str]:
    """The ``vllm`` entry point of this interpreter's environment (falls back to PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "vllm")
    return [here] if os.path.exists(here) else [shutil.which("vllm") or "vllm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s own process group (started with ``start_new_session``), SIGKILL after ``GRACE_S``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def log_tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def serve_command(model: str, engine: str, port: int, dtype: str, max_model_len: int) -> list[str]:
    """``vllm serve`` of ``model`` as ``engine`` on 127.0.0.1:``port`` (module docstring)."""
    cmd = vllm_command() + [
        "serve", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(harness.MAX_BATCHED_TOKENS),
        "--no-enable-prefix-caching", "--seed", "0", "--disable-access-log-for-endpoints", "/health,/metrics"]
    return cmd + (["--kv-cache-dtype", "fp8"] if engine == "stock-fp8" else [])


def bench_command(model: str, port: int, w: Workload, rate: float, num_warmups: int, out_dir: str,
                  filename: str) -> list[str]:
    """``vllm bench serve`` of workload ``w`` at ``rate`` against 127.0.0.1:``port`` (module docstring)."""
    return vllm_command() + [
        "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
        "--dataset-name", "random", "--random-input-len", str(w.input_len), "--random-output-len",
        str(w.output_len), "--num-prompts", str(w.num_prompts), "--request-rate", rate_label(rate),
        "--ignore-eos", "--seed", "0", "--temperature", "0", "--num-warmups", str(num_warmups),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result",
        "--result-dir", out_dir, "--result-filename", filename, "--disable-tqdm"]


class Server:
    """One ``vllm serve`` in its own process group; ``start`` waits for ``/health`` (ServerError if it exits or
    times out), ``stop`` ends the group."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str, port: int, timeout: float) -> None:
        self.cmd, self.env, self.name, self.port, self.timeout = cmd, env, name, port, timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self.startup_s = 0.0

    def start(self) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"serve-{self.name}-", suffix=".log")
        print(f"[{self.name}] {' '.join(self.cmd)}  (log: {self.log_path})", file=sys.stderr)
        t0 = time.time()
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        delay = 0.1
        while time.time() - t0 < self.timeout:
            if self.proc.poll() is not None:
                sys.stderr.write(log_tail(self.log_path))
                raise ServerError(f"vllm serve exited with {self.proc.returncode} before it was ready "
                                  f"(log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = round(time.time() - t0, 1)
                        return
            except OSError:
                pass
            time.sleep(delay)
            delay = min(3.0, 2 * delay)
        self.stop()
        raise ServerError(f"vllm serve not ready after {self.timeout:.0f} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


def run_client(cmd: list[str], env: dict[str, str], name: str, timeout: float, quiet: bool) -> None:
    """Run ``vllm bench serve`` in its own process group, output to a log; RuntimeError (naming the log) if it
    fails or runs over ``timeout`` s (then its group is stopped). Prints vLLM's result block unless
    ``quiet``."""
    fd, log_path = tempfile.mkstemp(prefix=f"bench-{'-'.join(name.replace('@', '').split())}-", suffix=".log")
    print(f"[{name}] {' '.join(cmd)}  (log: {log_path})", file=sys.stderr)
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"vllm bench serve ran over --timeout {timeout:.0f} s (log: {log_path})") from None
    finally:
        stop_group(proc)
    with open(log_path, errors="replace") as f:
        out = f.read()
    if proc.returncode:
        sys.stderr.write(out[-4000:])
        raise RuntimeError(f"vllm bench serve exited with {proc.returncode} (log: {log_path})")
    if not quiet:  # vLLM's own result block, without the client's start-up noise
        report = out[out.find("===="):]
        print(f"[{name}]\n{report[: report.rfind('====') + 4]}", file=sys.stderr)


# ---------------------------------------------------------------- one engine, all its runs

def engine_runs(a: argparse.Namespace, engine: str, plan: list[tuple[Workload, float]],
                max_model_len: int) -> list[dict]:
    """Serve ``engine`` and run every (workload, rate) of ``plan`` on it; one record per run (its figures, or
    ``error``). A failed run restarts the server for the next; a server that cannot start fails the rest."""
    model = a.dar if engine == "dar" else a.stock
    base = harness.dar_engine_env(a.dar_ops) if engine == "dar" else dict(os.environ)
    env = {**base, "VLLM_CPU_KVCACHE_SPACE": str(a.kv_gib), "HF_HUB_OFFLINE": "1"}
    client_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    records, server = [], None
    try:
        for i, (w, rate) in enumerate(plan):
            record = {"workload": w.name, "request_rate": rate_label(rate), "engine": engine}
            records.append(record)
            if server is None:
                port = free_port()
                server = Server(serve_command(model, engine, port, a.dtype, max_model_len), env, engine, port,
                                a.startup_timeout)
                try:
                    server.start()
                except ServerError as e:
                    print(f"[{engine}] {e}: its remaining runs fail", file=sys.stderr)
                    record["error"] = str(e)
                    records += [{"workload": w2.name, "request_rate": rate_label(r2), "engine": engine,
                                 "error": str(e)} for w2, r2 in plan[i + 1:]]
                    return records
                record["server_startup_s"] = server.startup_s
            filename = f"{w.name}-{rate_label(rate)}-{engine}.json"
            path = os.path.join(a.out_dir, filename)
            if os.path.exists(path):
                os.unlink(path)  # a failed run must not read an older result
            cmd = bench_command(model, server.port, w, rate, a.num_warmups, a.out_dir, filename)
            poller = MetricsPoller(f"http://127.0.0.1:{server.port}/metrics", a.metrics_interval)
            try:
                with poller:
                    run_client(cmd, client_env, f"{engine} {w.name} @ {rate_label(rate)}", a.timeout, a.json)
            except RuntimeError as e:
                record["error"] = str(e)
                print(f"[{engine}] {e}; restarting the server for the next run", file=sys.stderr)
                server.stop()
                server = None
                continue
            with open(path) as f:
                result = json.load(f)
            record.update({k: result.get(k) for k, _ in CLIENT_METRICS}, **poller.result())
    finally:
        if server is not None:
            server.stop()
    return records


# ---------------------------------------------------------------- summary, table, plot (pure)

def summarize(settings: dict, records: list[dict], skipped: dict[str, str]) -> dict:
    """Records of every engine -> the summary: one entry per (workload, rate) in run order, with each engine's
    figures (or error) and, when stock ran it, each other engine's ratios to stock (engine / stock)."""
    runs: dict[tuple[str, str], dict] = {}
    for r in records:
        key = (r["workload"], r["request_rate"])
        run = runs.setdefault(key, {"workload": key[0], "request_rate": key[1], "engines": {}, "ratio_to_stock": {}})
        run["engines"][r["engine"]] = {k: v for k, v in r.items() if k not in ("workload", "request_rate", "engine")}
    keys = [k for k, _ in CLIENT_METRICS + SERVER_METRICS]
    for run in runs.values():
        stock = run["engines"].get("stock", {})
        for engine, figures in run["engines"].items():
            if engine == "stock" or "error" in stock or "error" in figures or not stock:
                continue
            run["ratio_to_stock"][engine] = {k: figures[k] / stock[k] for k in keys
                                             if isinstance(figures.get(k), (int, float)) and stock.get(k)}
    return {"settings": settings, "skipped": skipped, "runs": list(runs.values())}


def describe(run: dict, workloads: dict[str, dict]) -> str:
    w = workloads[run["workload"]]
    when = "all at once" if run["request_rate"] == "inf" else f"{run['request_rate']} req/s"
    return f"{w['name']}, {when}: {w['num_prompts']} x {w['input_len']} in / {w['output_len']} out"


def format_table(summary: dict) -> str:
    """The summary as one text table per run: rows are figures, columns each engine, then ratios to stock."""
    engines = summary["settings"]["engines"]
    workloads = {w["name"]: w for w in summary["settings"]["workloads"]}
    lines = []
    for run in summary["runs"]:
        ran = [e for e in engines if e in run["engines"]]
        rated = [e for e in ran if e in run["ratio_to_stock"]]
        width = max([12] + [len(e) + 8 for e in rated])
        cell = f"{{:>{width}}}".format
        lines += ["", f"== {describe(run, workloads)}",
                  f"{'':24s}" + "".join(cell(e) for e in ran) + "".join(cell(f"{e}/stock") for e in rated)]
        for key, label in CLIENT_METRICS + SERVER_METRICS:
            values = [run["engines"][e].get(key) for e in ran]
            ratios = [run["ratio_to_stock"][e].get(key) for e in rated]
            lines.append(f"{label:24s}" + "".join(cell("-" if v is None else f"{v:.4g}") for v in values)
                         + "".join(cell("-" if r is None else f"{r:.3f}x") for r in ratios))
        lines += [f"{e}: FAILED: {run['engines'][e]['error']}" for e in ran if "error" in run["engines"][e]]
    lines += [f"{e}: skipped: {why}" for e, why in summary["skipped"].items()]
    return "\n".join(lines[1:])


def plot(summary: dict, path: str) -> bool:
    """Output tokens/s and median TPOT, a bar per engine grouped by run, ratios to stock over the bars, as a
    PNG at ``path``; False when matplotlib is missing."""
    plt = harness.pyplot()
    if plt is None:
        return False
    engines = summary["settings"]["engines"]
    runs = summary["runs"]
    labels = [f"{r['workload']}\n{'all at once' if r['request_rate'] == 'inf' else r['request_rate'] + ' req/s'}"
              for r in runs]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.8 * len(runs) + 1.5), 7.5))
    width = 0.8 / len(engines)
    for ax, (key, title) in zip(axes, (("output_throughput", "output tokens/s (higher is better)"),
                                       ("median_tpot_ms", "median TPOT, ms (lower is better)"))):
        for j, engine in enumerate(engines):
            xs, ys, notes = [], [], []
            for i, run in enumerate(runs):
                value = run["engines"].get(engine, {}).get(key)
                if value is None:
                    continue
                ratio = run["ratio_to_stock"].get(engine, {}).get(key)
                xs.append(i + (j - (len(engines) - 1) / 2) * width)
                ys.append(value)
                notes.append("" if ratio is None else f"{ratio:.2f}x")
            bars = ax.bar(xs, ys, width, label=engine, color=COLORS[engine])
            ax.bar_label(bars, notes, fontsize=7)
        ax.set_xticks(range(len(runs)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    s = summary["settings"]
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vllm bench serve, {s['dtype']}, VLLM_CPU_KVCACHE_SPACE={s['kv_gib']} GiB", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(ap)
    ap.add_argument("--workload", action="append", default=None,
                    help=f"{', '.join(WORKLOADS)} or N:IN:OUT; comma-separated or repeated "
                         "(default: decode-heavy,prompt-heavy)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"a subset of {','.join(ENGINES)} "
                    "(ratios need stock)")
    ap.add_argument("--request-rate", type=parse_rate, default=None,
                    help="the fixed-rate run's requests/s for every workload (default: each workload's; "
                         "inf: all at once only)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="vllm serve --dtype for every engine")
    ap.add_argument("--kv-gib", type=int, default=1,
                    help="VLLM_CPU_KVCACHE_SPACE for every engine (whole GiB: vLLM reads it with int())")
    ap.add_argument("--dar-ops", choices=envs.OPS_KINDS, default=None,
                    help="VLLM_DAR_OPS for the DAR server (default: the environment's, else the plugin's)")
    ap.add_argument("--num-warmups", type=int, default=2, help="vllm bench serve --num-warmups, per run")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one client run may take")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds a server may take to start")
    ap.add_argument("--metrics-interval", type=float, default=0.5, help="seconds between /metrics scrapes")
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--json", action="store_true", help="print only the summary JSON")
    a = ap.parse_args(argv)
    a.workloads = parse_workloads(a.workload or ["decode-heavy,prompt-heavy"])
    a.engine_list = parse_engines(a.engines)
    if a.kv_gib < 1:
        ap.error(f"--kv-gib {a.kv_gib}: must be a whole number of GiB >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if "dar" in a.engine_list:
        with open(os.path.join(a.dar, "config.json")) as f:
            if "dar" not in json.load(f):
                raise SystemExit(f"--dar {a.dar}: config.json has no dar section")
    ops = harness.dar_ops(a.dar_ops) if "dar" in a.engine_list else None  # refuses a bad VLLM_DAR_OPS early
    skipped = {}
    if "stock-fp8" in a.engine_list and (why := harness.fp8_kv_unsupported()):
        print(f"[stock-fp8] skipped: {why}", file=sys.stderr)
        skipped["stock-fp8"] = why
    plan = run_plan(a.workloads, a.request_rate)
    max_model_len = max(w.input_len + w.output_len for w in a.workloads) + 64
    os.makedirs(a.out_dir, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through every stop()
    records = []
    try:
        for engine in a.engine_list:
            if engine not in skipped:
                records += engine_runs(a, engine, plan, max_model_len)
    finally:
        signal.signal(signal.SIGTERM, previous)
    settings = {"stock": a.stock, "dar": a.dar, "engines": [e for e in a.engine_list if e not in skipped],
                "workloads": [asdict(w) for w in a.workloads], "dtype": a.dtype, "kv_gib": a.kv_gib,
                "max_model_len": max_model_len, "max_num_batched_tokens": harness.MAX_BATCHED_TOKENS,
                "num_warmups": a.num_warmups, "dar_ops": ops, "metrics_interval_s": a.metrics_interval}
    summary = summarize(settings, records, skipped)
    harness.write_json(os.path.join(a.out_dir, "summary.json"), summary)
    png = os.path.join(a.out_dir, "summary.png")
    if not plot(summary, png):
        print("matplotlib is not importable: no plot", file=sys.stderr)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
        print(f"\n{os.path.join(a.out_dir, 'summary.json')}, {png}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
