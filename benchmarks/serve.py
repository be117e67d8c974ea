"""vLLM's own serving benchmark (``vllm bench serve``) against ``vllm serve`` of the stock and the DAR model, in turn.

For each model (stock first, then DAR) this starts ``vllm serve MODEL`` (our plugin is installed, so the DAR
directory, whose config.json has a ``dar`` section, is served by the DAR backend) with the same settings::

    VLLM_CPU_KVCACHE_SPACE=<--kv-gib> vllm serve MODEL --port P --dtype float32 --max-model-len IN+OUT+64 \\
        --max-num-batched-tokens 4096 --no-enable-prefix-caching --seed 0

waits for ``/health``, runs vLLM's client on it::

    vllm bench serve --backend vllm --base-url http://127.0.0.1:P --model MODEL --dataset-name random \\
        --random-input-len IN --random-output-len OUT --num-prompts N --ignore-eos --seed 0 --temperature 0 \\
        --num-warmups 2 --save-result --result-dir benchmarks/results/serve --result-filename {stock,dar}.json

(``--request-rate`` defaults to inf: all prompts at once; ``--dar-ops``, else ``VLLM_DAR_OPS`` from the
environment, picks the DAR server's ops and is recorded), stops the server (SIGTERM to the process group it
started, SIGKILL after 60 s) and prints TPOT/TTFT/ITL/throughput side by side with DAR / stock ratios; the
same summary goes to ``benchmarks/results/serve/summary.json``. Server logs go to ``/tmp``, named on stderr.
Run (10-20 min on the loaded 2-core machine, mostly two server start-ups with compilation)::

    python benchmarks/serve.py --dar /tmp/tp-dar [--num-prompts 16 --input-len 512 --output-len 64 --kv-gib 2]
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
import time
import urllib.request

import harness

from vllm_dar import envs

OUT_DIR = os.path.join(harness.RESULTS, "serve")
METRICS = ("mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms", "mean_ttft_ms", "median_ttft_ms",
           "p99_ttft_ms", "output_throughput", "total_token_throughput", "request_throughput", "duration")


def vllm_command() -> list[str]:
    """The ``vllm`` entry point of this interpreter's environment (falls back to PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "vllm")
    return [here] if os.path.exists(here) else [shutil.which("vllm") or "vllm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, log_path: str, timeout: float) -> None:
    """Poll ``/health`` until it answers 200; fail with the log's tail if the server exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                sys.stderr.write("".join(f.readlines()[-40:]))
            raise SystemExit(f"vllm serve exited with {proc.returncode} before it was ready (log: {log_path})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(3)
    raise SystemExit(f"vllm serve not ready after {timeout:.0f} s (log: {log_path})")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (started with ``start_new_session``), SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_one(args: argparse.Namespace, name: str, model: str) -> dict:
    """Serve ``model``, benchmark it with ``vllm bench serve``, stop the server; the saved result JSON."""
    port = free_port()
    env = {**(harness.dar_engine_env(args.dar_ops) if name == "dar" else os.environ),
           "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    serve = vllm_command() + [
        "serve", model, "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
        "--max-model-len", str(args.input_len + args.output_len + 64), "--max-num-batched-tokens", "4096",
        "--no-enable-prefix-caching", "--seed", "0"]
    fd, log_path = tempfile.mkstemp(prefix=f"serve-{name}-", suffix=".log")
    print(f"[{name}] {' '.join(serve)}  (log: {log_path})", file=sys.stderr)
    t0 = time.time()
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(proc, port, log_path, args.startup_timeout)
        startup = time.time() - t0
        bench = vllm_command() + [
            "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--model", model,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts), "--ignore-eos",
            "--seed", "0", "--temperature", "0", "--num-warmups", str(args.num_warmups), "--save-result",
            "--result-dir", args.out_dir, "--result-filename", f"{name}.json", "--disable-tqdm"]
        print(f"[{name}] {' '.join(bench)}", file=sys.stderr)
        done = subprocess.run(bench, check=False, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"vllm bench serve failed on {name} (exit {done.returncode}); server log: {log_path}")
        if not args.json:  # vLLM's own result block, without the client's start-up noise
            report = done.stdout[done.stdout.find("===="):]
            print(f"[{name}]\n{report[: report.rfind('====') + 4]}", file=sys.stderr)
    finally:
        stop(proc)
    with open(os.path.join(args.out_dir, f"{name}.json")) as f:
        result = json.load(f)
    result["server_startup_s"] = round(startup, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_args(ap)
    ap.add_argument("--dar-ops", choices=envs.OPS_KINDS, default=None,
                    help="VLLM_DAR_OPS for the DAR server (default: the environment's, else the plugin's)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-warmups", type=int, default=2)
    ap.add_argument("--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for both servers")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--json", action="store_true", help="print only the summary JSON")
    a = ap.parse_args()
    with open(os.path.join(a.dar, "config.json")) as f:
        if "dar" not in json.load(f):
            raise SystemExit(f"--dar {a.dar}: config.json has no dar section")
    ops = harness.dar_ops(a.dar_ops)  # refuses a bad VLLM_DAR_OPS before the servers start
    os.makedirs(a.out_dir, exist_ok=True)
    results = {name: run_one(a, name, model) for name, model in (("stock", a.stock), ("dar", a.dar))}
    summary = {
        "settings": {k: getattr(a, k) for k in ("stock", "dar", "num_prompts", "input_len", "output_len",
                                                 "num_warmups", "kv_gib")},
        "dar_ops": ops,
        **{name: {k: r.get(k) for k in METRICS + ("completed", "server_startup_s")} for name, r in results.items()},
        "ratio_dar_over_stock": {k: results["dar"][k] / results["stock"][k] for k in METRICS
                                 if results["stock"].get(k) and results["dar"].get(k) is not None},
    }
    harness.write_json(os.path.join(a.out_dir, "summary.json"), summary)
    if a.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'metric':24s} {'stock':>10s} {'dar':>10s} {'dar/stock':>10s}")
    for k in METRICS:
        s, d = summary["stock"][k], summary["dar"][k]
        r = summary["ratio_dar_over_stock"].get(k)
        print(f"{k:24s} {s:10.2f} {d:10.2f} {'' if r is None else f'{r:10.3f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
