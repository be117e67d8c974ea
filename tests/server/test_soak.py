"""The soak benchmark's short form (``benchmarks/soak.py``): a few dozen mixed requests (streaming or not, n > 1,
seeded sampling, stop strings, 20% cancelled mid-stream, some aborted before their first token) against `vllm serve`
of DAR (the benchmark also runs stock vLLM, for the latency ratio; here only what DAR must do). The engine must
answer every valid request, free every KV block, stay up, and give the greedy requests under load the text they
get alone."""
from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.append(BENCHMARKS)  # appended: benchmarks/kernels.py must not shadow the tests/kernels package
REQUESTS = 40


@pytest.fixture(scope="module")
def result(dar_smol, default_model):  # default_model: the prompt pool's tokenizer
    import soak

    a = soak.parse_args(["--requests", str(REQUESTS), "--concurrency", "8", "--model", dar_smol, "--stock",
                         default_model, "--engines", "dar", "--max-model-len", "1024", "--greedy-checks", "12",
                         "--time-limit", "600", "--seed", "1", "--eager"])
    return soak.run(a)


def test_soak(result):
    r = result["engines"]["dar"]
    assert "error" not in r, r
    assert r["errors"] == 0, r["error_examples"]
    assert r["not_sent"] == 0 and r["sent"] == REQUESTS
    assert r["completed"] + r["cancelled"] + r["aborted_before_first_token"] == REQUESTS
    assert r["cancelled"] > 0 and r["completed"] > 0
    assert r["kv_usage_after"] == 0 and r["running_after"] == 0 and r["waiting_after"] == 0, r
    assert r["alive"] and r["alive_after_checks"]
    assert r["greedy_checked"] > 0
    assert r["greedy_mismatches"] == 0, r["greedy_mismatch_examples"]

