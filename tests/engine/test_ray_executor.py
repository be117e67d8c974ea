"""A DAR model through ``distributed_executor_backend="ray"`` on the CPU platform
(``vllm_dar.patches.cpu_ray_executor``), against a local Ray cluster this module starts and stops: greedy tokens
must equal the same model's in one process without Ray, at TP 1 and TP 3 (SmolLM2: 9 heads, 3 KV heads).

The two Ray runs take the patch's two routes: engine-core process (``processes``: the executor class arrives
pickled, so its module is already imported when the plugin loads) and one process (``Executor.get_class``
resolves it after the plugin loaded). Needs ``ray``, an optional dependency (``vllm-dar[ray]``) that
``scripts/setup.sh`` installs: skipped without it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .helpers import run_engine

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
TP = 3


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A one-node Ray cluster of ``TP`` logical CPUs (placement bundles are {"CPU": 1} per rank), in its own
    session and temp dir; killed with its process group at the end (never ``ray stop``: other clusters live)."""
    temp = tmp_path_factory.mktemp("ray")
    log = temp / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", "--port", "0",
             "--num-cpus", str(TP), "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats",
             "--object-store-memory", str(200 * 2**20), "--temp-dir", str(temp)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = None
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            assert head.poll() is None, "ray start exited: " + log.read_text()[-3000:]
            time.sleep(1)
            found = re.search(r"ray start --address='([^']+)'", log.read_text())
            address = found and found.group(1)
        assert address, "Ray head not up after 120 s"
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops the node's processes, then exits
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)


def tokens(run: list[dict]) -> list[list[int]]:
    return [r["tokens"] for r in run]


def test_dar_through_ray_matches_without(dar_smol_pyramid, doc_tokens, ray_address, tmp_path):
    """The recipe's layout (joint projections: under TP the ranks all-reduce the far K/V, here through Ray's
    workers) at TP 1 and TP 3 gives the tokens of one process without Ray."""
    prompts = [doc_tokens[:600], doc_tokens[700:708]]  # far beyond the windows, and within them
    ray_env = {"RAY_ADDRESS": ray_address}

    uni = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=16)
    ray1 = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=16, processes=True, env=ray_env,
                      engine={"distributed_executor_backend": "ray"})
    assert tokens(ray1[0]) == tokens(uni[0])
    ray3 = run_engine(tmp_path, dar_smol_pyramid, [prompts], max_tokens=16, env=ray_env,
                      engine={"distributed_executor_backend": "ray", "tensor_parallel_size": TP})
    assert tokens(ray3[0]) == tokens(uni[0])
