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


@pytest.mark.parametrize("ops_kind", ["cpp", "reference"])
def test_joint_group_across_ranks_serves_the_whole_layer(ops_kind):
    """A joint projection group split over 3 ranks: each rank writes its heads' window and the all-reduced
    reduced K/V (``write_across_ranks``, the ranks' partial projections summed), then attends over its heads with
    the real ops; the ranks' outputs, concatenated along heads, equal DAR attention over the whole layer."""
    import torch

    from vllm_dar.ops import select_ops
    from vllm_dar.ops.paged import PagedProjections, reduce_tokens
    from vllm_dar.plugin.common import write_across_ranks
    from vllm_dar.plugin.model import shard_projections
    from vllm_dar.reference import LayerProjections, dar_attention

    torch.manual_seed(0)
    h, j, d, rk, rv, t, tp, wbs, fbs = 6, 3, 16, 5, 7, 60, 3, 8, 16
    p = LayerProjections(q_proj=torch.randn(j, d, rk) / d ** 0.5, k_down=torch.randn(1, j * d, rk) / 7,
                         v_down=torch.randn(1, j * d, rv) / 7, v_up=torch.randn(j, rv, d) / rv ** 0.5)
    q, k, v = torch.randn(t, h, d), torch.randn(t, j, d), torch.randn(t, j, d)
    shards = [shard_projections(p, tp, r) for r in range(tp)]
    heads = [slice(r * h // tp, (r + 1) * h // tp) for r in range(tp)]
    kv_heads = [slice(r * j // tp, (r + 1) * j // tp) for r in range(tp)]
    partial = [torch.cat([reduce_tokens(k[:, js], s.k_down), reduce_tokens(v[:, js], s.v_down)], dim=-1)
               for s, js in zip(shards, kv_heads)]
    ops = select_ops(ops_kind)
    pos = torch.arange(t)
    window_table = (torch.randperm(15)[: -(-t // wbs)] + 1).int()[None]  # shuffled blocks; 0: vLLM's null block
    far_table = (torch.randperm(8)[: -(-t // fbs)] + 1).int()[None]
    window_slots = window_table[0, pos // wbs].long() * wbs + pos % wbs
    far_slots = far_table[0, pos // fbs].long() * fbs + pos % fbs
    parts = []
    for r, (s, hs, js) in enumerate(zip(shards, heads, kv_heads)):
        wcache, fcache = torch.full((16, 1, wbs, 2 * d), float("nan")), torch.full((9, 1, fbs, rk + rv), float("nan"))

        def all_reduce(x, r=r):
            torch.testing.assert_close(x, partial[r])
            return sum(partial)

        paged = PagedProjections.from_layer(s, h // tp)
        write_across_ranks(ops, k[:, js], v[:, js], window_cache=wcache, window_slots=window_slots,
                           far_cache=fcache, far_slots=far_slots, proj=paged, k_scale=1.0, v_scale=1.0,
                           all_reduce=all_reduce)
        out = torch.full((t, h // tp, d), float("nan"))
        ops.attend(q[:, hs], k[:, js], v[:, js], out, window_cache=wcache, window_table=window_table, far_cache=fcache,
                   far_table=far_table, query_start_loc=[0, t], seq_lens=[t], proj=paged, window=8,
                   sink_tokens=2, scale=0.25)
        parts.append(out)
    whole = dar_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], p, window=8,
                          sink_tokens=2, scale=0.25)[0].transpose(0, 1)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_refuses_kv_heads_it_cannot_split():
    import torch

    from vllm_dar.config import DarConfigError
    from vllm_dar.plugin.model import shard_projections
    from vllm_dar.reference import LayerProjections

    joint = LayerProjections(q_proj=torch.zeros(4, 16, 8), k_down=torch.zeros(1, 64, 8),
                             v_down=torch.zeros(1, 64, 8), v_up=torch.zeros(4, 8, 16))
    with pytest.raises(DarConfigError, match="tensor_parallel_size=3 does not divide the 4 KV heads"):
        shard_projections(joint, 3, 0)
    pairs = LayerProjections(q_proj=torch.zeros(4, 16, 8), k_down=torch.zeros(2, 32, 8),
                             v_down=torch.zeros(2, 32, 8), v_up=torch.zeros(4, 8, 16))
    with pytest.raises(DarConfigError, match="2 projection groups of 2 KV heads each span ranks of 1"):
        shard_projections(pairs, 4, 0)
