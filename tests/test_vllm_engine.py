"""``--engine vllm``: the real vLLM engine scores the stock model like the reference; a DAR model is refused
clearly while the plugin's backend is missing."""
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
    return subprocess.run([sys.executable, "-m", "vllm_dar.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_vllm_perplexity_matches_reference(default_model):
    text = split_files()[1][:3]
    common = ["eval", default_model, "--text", *text, "--context", "256", "--max-windows", "2", "--json",
              "--quiet", "--dtype", "float32"]
    hf = run_cli(*common)
    vl = run_cli(*common, "--engine", "vllm")
    assert hf.returncode == 0, hf.stderr[-2000:]
    assert vl.returncode == 0, vl.stderr[-2000:]
    a, b = json.loads(hf.stdout), json.loads(vl.stdout.strip().splitlines()[-1])
    assert a["tokens"] == b["tokens"] == 510
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=5e-3)


def test_dar_model_needs_the_backend(tmp_path, default_model):
    raw = json.load(open(os.path.join(default_model, "config.json")))
    raw["dar"] = {"format_version": 1, "window": [64] * 30, "key_rank": [16] * 30, "value_rank": [16] * 30}
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    (tmp_path / "p.txt").write_text("hello")
    res = run_cli("generate", str(d), "--prompt-file", str(tmp_path / "p.txt"), "--engine", "vllm")
    from importlib.util import find_spec

    if find_spec("vllm_dar.plugin.backend") is None:
        assert res.returncode == 2 and "needs vllm-dar's attention backend" in res.stderr
