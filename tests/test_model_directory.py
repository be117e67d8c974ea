"""Where the plugin reads a DAR model's projections from: a local directory, or the Hugging Face cache snapshot
vLLM serves a hub id from (offline; the layout ``models--ORG--NAME/{refs/main, snapshots/REV/...}``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CODE = """
import sys
from vllm_dar.plugin.model import dar_model, model_directory
path = model_directory(sys.argv[1], None)
model = dar_model(path)
print(path)
print(len(model.projections), model.cfg.window[0])
"""


def hf_cache_copy(model_dir: str, cache: str, repo: str = "local/dar-tiny", revision: str = "0" * 40) -> str:
    """Lay ``model_dir`` out as the Hugging Face cache would after a download of ``repo``."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    shutil.copytree(model_dir, os.path.join(root, "snapshots", revision))
    return os.path.join(root, "snapshots", revision)


def run(model: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", CODE, model], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def tiny_dar(tiny_llama, tmp_path):
    from vllm_dar.convert import convert

    out = str(tmp_path / "dar")
    convert(tiny_llama, out, window=4, key_rank=2, value_rank=2, calib_tokens=256, progress=False)
    return out


def test_hub_id_resolves_to_its_cache_snapshot(tiny_dar, tmp_path):
    cache = str(tmp_path / "hub")
    snapshot = hf_cache_copy(tiny_dar, cache)
    proc = run("local/dar-tiny", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, summary = proc.stdout.split("\n")[:2]
    assert os.path.samefile(path, snapshot)
    assert summary.split()[1] == "4"


def test_missing_model_names_the_problem(tmp_path):
    proc = run("local/not-downloaded", str(tmp_path / "hub"))
    assert proc.returncode != 0
    assert "neither a local directory nor a snapshot in the Hugging Face cache" in proc.stderr
