"""The kernel path (``vllm_dar.kernels``, the launchers, ``vllm_dar.ops.paged``, ``vllm_dar.reference``) and the
converter and healing entry points import and run where vLLM is not installed, as on the GPU machine.

A subprocess runs with ``tests/no_vllm`` on ``PYTHONPATH`` (its ``sitecustomize`` hides vLLM), checks that vLLM
is hidden, imports the modules, launches the kernels on a small decode batch against the reference, and reports
any ``vllm`` module that got imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton")

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = """
import importlib.util, json, sys
assert importlib.util.find_spec("vllm") is None, "tests/no_vllm did not hide vLLM"
import torch
import vllm_dar, vllm_dar.cli, vllm_dar.convert, vllm_dar.heal, vllm_dar.kernels, vllm_dar.reference
from vllm_dar.ops.paged import dar_paged_attention
from vllm_dar.ops.triton_ops import dar_paged_attention_triton
from kernels.layout import Shape, build_batch, kernel_device

b = build_batch([(40, 1), (9, 1)], Shape(4, 2, 16, 16, 16), window=8, sinks=2, device=kernel_device())
out = torch.full_like(b.query, float("nan"))
kw = b.kwargs(window=8, sink_tokens=2, scale=0.3)
dar_paged_attention_triton(b.query, b.key, b.value, out, **kw)
torch.testing.assert_close(out.cpu(), b.reference, rtol=1e-5, atol=1e-5)
print(json.dumps(sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))))
"""


def test_kernel_path_runs_without_vllm():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "no_vllm"), str(TESTS)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # TRITON_INTERPRET as the conftest set it (1 without CUDA); cwd: `kernels` is tests/kernels there
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=TESTS, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
