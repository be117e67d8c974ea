"""Run a real vLLM engine in a fresh process (``engine_job.py``) and read back what it generated; start and stop
``vllm serve`` on localhost."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def run_engine(tmp_path, model: str, runs: list[list[list[int]]], *, max_tokens: int, capacity: bool = False,
               **job):
    """Generate greedily (or with ``sampling``: SamplingParams kwargs) with a real vLLM engine in a fresh process
    (``engine_result``). Returns, per run, per prompt, {"tokens": [...], "cached": num_cached_tokens, "logprobs"};
    with ``capacity`` also vLLM's logged KV capacity (tokens), as ``(runs, capacity)``."""
    result = engine_result(tmp_path, model, runs, max_tokens=max_tokens, **job)
    return (result["runs"], result["kv_capacity_tokens"]) if capacity else result["runs"]


def engine_result(tmp_path, model: str, runs: list[list[list[int]]], *, max_tokens: int, engine: dict | None = None,
                  plugins: bool = True, timeout: float = 1200, logprobs: bool = False, env: dict | None = None,
                  sampling: dict | None = None, score: list[list[int]] | None = None,
                  processes: bool = False) -> dict:
    """Run ``engine_job.py`` (a real vLLM engine in a fresh process) and return its whole result: "runs",
    "kv_capacity_tokens" and, for ``score`` windows, "score" (``vllm_engine.windows_perplexity``).
    ``plugins=False`` sets VLLM_PLUGINS="" (stock vLLM); ``env``: extra environment; ``processes``: vLLM's
    default engine-core and worker processes instead of one (engine_job.py)."""
    job, out = tmp_path / f"job{len(os.listdir(tmp_path))}.json", tmp_path / "out.json"
    job.write_text(json.dumps({"model": model, "engine": engine or {}, "max_tokens": max_tokens, "runs": runs,
                               "logprobs": logprobs, "sampling": sampling or {}, "score": score,
                               "processes": processes}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "engine_job.py"), str(job), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    # The second: the job shut its engine down itself (vllm_engine.shutdown_llm), not vLLM's finalizers at exit.
    if proc.returncode != 0 or "engine core exited unexpectedly" in proc.stderr:
        raise EngineFailed(proc.stdout[-4000:] + proc.stderr[-8000:])
    result = json.loads(out.read_text())
    # ... and no client thread of vLLM's outlived that shutdown (one that does can abort the exit: shutdown_llm).
    assert result["client_threads_after_shutdown"] == [], result["client_threads_after_shutdown"]
    return result


class EngineFailed(RuntimeError):
    """The engine process exited with an error; the message holds the tail of its output."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests serve on localhost only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """``vllm serve MODEL *args`` on a free port of 127.0.0.1, in its own session (``stop_server``), its output in
    the file ``log``; this process's environment with 1 GiB of KV (``VLLM_CPU_KVCACHE_SPACE``) and ``env``.
    Returns (process, port)."""
    port = free_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm"), "serve", model, "--host", "127.0.0.1", "--port",
           str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    return proc, port


def wait_ready(url: str, server: subprocess.Popen, timeout: float, log=None) -> None:
    """Poll ``url`` until it answers; fail if ``server`` exits first or ``timeout`` seconds pass (with ``log``, the
    file of the server's output: the test fails with its tail)."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, f"vllm serve exited with {server.returncode}"
            try:
                with urllib.request.urlopen(url, timeout=5):
                    return
            except OSError:
                time.sleep(2)
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s")
    except (AssertionError, TimeoutError) as e:
        if log is None:
            raise
        import pytest

        with open(log) as f:
            pytest.fail(f"{e}\n--- server log (tail) ---\n{f.read()[-6000:]}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (started with ``start_new_session``), SIGKILL after 30 s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the API server and its engine core
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
