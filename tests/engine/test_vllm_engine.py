"""``--engine vllm``: the real vLLM engine (with vllm-dar's backend for DAR models) scores like the reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_dar.data import split_files

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([sys.executable, "-m", "vllm_dar.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env)


def eval_both_engines(*args: str) -> tuple[dict, dict]:
    """``vllm-dar eval ARGS --json`` on the hf and the vllm engine: (hf result, vllm result)."""
    hf = run_cli("eval", *args, "--json", "--quiet")
    vl = run_cli("eval", *args, "--json", "--quiet", "--engine", "vllm")
    assert hf.returncode == 0, hf.stderr[-2000:]
    assert vl.returncode == 0, vl.stderr[-2000:]
    # The engine was shut down by the CLI, not by vLLM's finalizers at exit (where its monitor thread's clean-up
    # races the interpreter's finalization and can abort the process: vllm_engine.shutdown_llm).
    assert "engine core exited unexpectedly" not in vl.stderr, vl.stderr[-2000:]
    return json.loads(hf.stdout), json.loads(vl.stdout.strip().splitlines()[-1])


def test_vllm_perplexity_matches_reference(default_model):
    text = split_files()[1][:3]
    a, b = eval_both_engines(default_model, "--text", *text, "--context", "256", "--max-windows", "2",
                             "--dtype", "float32")
    assert a["tokens"] == b["tokens"] == 510
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=5e-3)


def test_vllm_dar_perplexity_matches_reference(dar_smol_pyramid):
    """Per-layer windows and ranks, joint projections (several window and far cache groups)."""
    text = split_files()[1][:3]
    a, b = eval_both_engines(dar_smol_pyramid, "--text", *text, "--context", "512", "--max-windows", "2")
    assert a["tokens"] == b["tokens"] == 1022
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=5e-3)  # the acceptance: within 0.5%
