"""`vllm serve` refuses to start on a DAR checkpoint it cannot serve correctly, and says why.

Each case copies the converted default model (weights hard-linked), damages one thing, and starts the real
server: it must exit non-zero before serving, with a message that names the problem.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def damaged_copy(src: str, dst: Path, case: str) -> str:
    shutil.copytree(src, dst, copy_function=os.link)
    proj = dst / "dar" / "projections.safetensors"
    proj.unlink()  # a fresh file, never the hard link to the shared fixture
    if case == "corrupt":
        proj.write_bytes(b"\x00" * 64)
    elif case == "wrong_shape":  # the config claims rank 8 for layer 0; the tensors have 16
        shutil.copy(Path(src) / "dar" / "projections.safetensors", proj)
        cfg_path = dst / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["dar"]["key_rank"][0] = 8
        cfg_path.unlink()
        cfg_path.write_text(json.dumps(cfg))
    return str(dst)


CASES = {
    "missing": "projections.safetensors does not exist",
    "corrupt": "is not a readable safetensors file",
    "wrong_shape": "tensor layers.0.q_proj has shape (3, 64, 16)",
}


@pytest.mark.parametrize("case", CASES)
def test_serve_refuses_bad_projections(dar_smol, tmp_path, case):
    model = damaged_copy(dar_smol, tmp_path / "model", case)
    cmd = [str(BIN / "vllm"), "serve", model, "--max-model-len", "512", "--gpu-memory-utilization", "0.5",
           "--port", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert CASES[case] in out, out[-6000:]
