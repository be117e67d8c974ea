"""The served DAR model's state in the plugin: where its projections are read from (a local directory, or the Hugging
Face cache snapshot vLLM serves a hub id from, offline), and how they shard across tensor-parallel ranks."""
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
    convert(tiny_llama, out, window=4, key_rank=2, value_rank=2, sink_tokens=4, schedule="uniform",
            head_sharing="per_head", calib_tokens=256, progress=False)
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


def test_tensor_parallel_shards_concatenate_to_the_whole():
    """Each rank attends over its own query and KV heads with its shard of the projections; the ranks' outputs,
    concatenated along heads, equal DAR attention over all heads (what tensor-parallel serving computes)."""
    import torch

    from vllm_dar.plugin.model import shard_projections
    from vllm_dar.reference import LayerProjections, dar_attention

    torch.manual_seed(0)
    h, j, d, t, tp = 8, 4, 16, 40, 2
    p = LayerProjections(q_proj=torch.randn(j, d, 5), k_down=torch.randn(j, d, 5), v_down=torch.randn(j, d, 6),
                         v_up=torch.randn(j, 6, d))
    q, k, v = torch.randn(1, h, t, d), torch.randn(1, j, t, d), torch.randn(1, j, t, d)
    whole = dar_attention(q, k, v, p, window=8, sink_tokens=2)
    parts = []
    for rank in range(tp):
        hs, js = slice(rank * h // tp, (rank + 1) * h // tp), slice(rank * j // tp, (rank + 1) * j // tp)
        parts.append(dar_attention(q[:, hs], k[:, js], v[:, js], shard_projections(p, tp, rank), window=8,
                                   sink_tokens=2))
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_refuses_groups_across_ranks():
    import torch

    from vllm_dar.config import DarConfigError
    from vllm_dar.plugin.model import shard_projections
    from vllm_dar.reference import LayerProjections

    joint = LayerProjections(q_proj=torch.zeros(4, 16, 8), k_down=torch.zeros(1, 64, 8),
                             v_down=torch.zeros(1, 64, 8), v_up=torch.zeros(4, 8, 16))
    with pytest.raises(DarConfigError, match="a projection group spans 4 KV heads, more than the 2 of one rank"):
        shard_projections(joint, 2, 0)
    with pytest.raises(DarConfigError, match="tensor_parallel_size=3 does not divide the 4 KV heads"):
        shard_projections(joint, 3, 0)
