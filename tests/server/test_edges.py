"""Edge inputs through `vllm serve`: each case goes to a DAR server and to a stock server of the model it was
converted from (both fp32, both up at once) and must get the same class of result: a completion of the same
shape, or the same HTTP status. Where DAR's greedy tokens can be checked, they must equal the Hugging Face DAR
reference's (prompt lengths around the window w=64, the sinks and vLLM's 16-token blocks).

Preemption: a third, DAR server whose KV pool holds fewer blocks than four concurrent long requests need
(``--num-gpu-blocks-override``, which vLLM applies on every platform): vLLM must preempt some (its
``vllm:num_preemptions_total`` rises) and each must still give the greedy tokens it gets alone.
"""
from __future__ import annotations

import contextlib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine.helpers import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow
MAX_LEN = 512
W = 64  # dar_smol's window
# The small-KV server's pool, in blocks (one 512-token request needs ~17). With 4 x 300-token prompts vLLM
# admitted only what fits to the end (no preemption at 40 or 36 blocks); short prompts are all admitted, then grow.
PREEMPT_BLOCKS = 36


class Api:
    """One server's /v1/completions (httpx: any status comes back, nothing retries)."""

    def __init__(self, port: int, model: str, log: Path):
        self.base, self.model, self.log = f"http://127.0.0.1:{port}", model, log

    def complete(self, **body):
        import httpx

        return httpx.post(f"{self.base}/v1/completions", json={"model": self.model, **body}, timeout=600)

    def metric(self, name: str) -> float:
        import httpx

        lines = httpx.get(f"{self.base}/metrics", timeout=30).text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith((name + "{", name + " ")))


def start(model: str, log: Path, *extra: str) -> tuple[subprocess.Popen, Api]:
    """``vllm serve`` in its own session (fp32, eager: no minutes of torch.compile per server in a test)."""
    proc, port = start_server(model, log, "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--seed", "0",
                              "--enforce-eager", "--disable-access-log-for-endpoints", "/health,/metrics", *extra,
                              env={"HF_HUB_OFFLINE": "1"})
    return proc, Api(port, model, log)


@contextlib.contextmanager
def served(**servers: tuple[subprocess.Popen, Api]):
    """Wait for every started server (they start together), yield {name: Api}, check none died, stop all."""
    try:
        for proc, api in servers.values():
            wait_ready(f"{api.base}/health", proc, timeout=900, log=api.log)
        yield {name: api for name, (_, api) in servers.items()}
        for proc, api in servers.values():
            assert proc.poll() is None, f"the server died: {api.log.read_text()[-6000:]}"
    finally:
        for proc, _ in servers.values():
            stop_server(proc)


@pytest.fixture(scope="module")
def servers(dar_smol, default_model, tmp_path_factory):
    """A DAR and a stock server, started at once."""
    logs = tmp_path_factory.mktemp("edges")
    with served(dar=start(dar_smol, logs / "dar.log"), stock=start(default_model, logs / "stock.log")) as apis:
        yield apis


@pytest.fixture(scope="module")
def small_server(dar_smol, tmp_path_factory):
    """A DAR server whose pool holds PREEMPT_BLOCKS blocks (the preemption test)."""
    log = tmp_path_factory.mktemp("edges-small") / "small.log"
    with served(small=start(dar_smol, log, "--num-gpu-blocks-override", str(PREEMPT_BLOCKS),
                            "--no-enable-prefix-caching")) as apis:
        yield apis["small"]


@pytest.fixture(scope="module")
def text_ids(dar_smol) -> list[int]:
    """Held-out documentation tokens, enough for a prompt over the limit."""
    from transformers import AutoTokenizer

    from vllm_dar.data import split_files

    tok = AutoTokenizer.from_pretrained(dar_smol)
    ids: list[int] = []
    for path in split_files()[1]:
        ids += tok(Path(path).read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) > 2 * MAX_LEN:
            return ids
    raise AssertionError("not enough held-out text")


@pytest.fixture(scope="module")
def reference(dar_smol):
    """Greedy tokens of the Hugging Face DAR reference (fp32), one prompt at a time."""
    from vllm_dar.evaluate import greedy, load_for_eval

    model, _, cfg, projections = load_for_eval(dar_smol, "float32")
    return lambda prompt, n: greedy(model, prompt, n, cfg=cfg, projections=projections)


GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
LENGTHS = [1, 4, 5, 15, 16, 17, W - 1, W, W + 1, 127, 128, 129]


def outcome(resp) -> tuple:
    """The class of a result: ("status", code) for a refusal; for a completion, the choice count and, per
    choice, its finish reason and token count (what DAR and stock must share)."""
    if resp.status_code != 200:
        return ("status", resp.status_code)
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    return ("ok", len(choices), tuple((c["finish_reason"], len(c.get("token_ids") or [])) for c in choices))


def both(servers, **body) -> dict:
    return {name: api.complete(**body) for name, api in servers.items()}


def assert_same_class(got: dict) -> tuple:
    classes = {name: outcome(r) for name, r in got.items()}
    assert classes["dar"] == classes["stock"], {n: (classes[n], got[n].text[:500]) for n in got}
    return classes["dar"]


@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_length_at_edges(servers, text_ids, reference, length):
    """Around sinks (4), blocks (16, 128) and the window (64): same class as stock, the reference's tokens."""
    prompt = text_ids[:length]
    got = both(servers, prompt=prompt, **GREEDY)
    assert assert_same_class(got) == ("ok", 1, (("length", 8),))
    assert got["dar"].json()["choices"][0]["token_ids"] == reference(prompt, 8)


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-text", "empty-ids"])
def test_empty_prompt(servers, prompt):
    assert_same_class(both(servers, prompt=prompt, **GREEDY))


# (prompt tokens, max_tokens): exactly at the limit, one over in prompt, in max_tokens, max_tokens to the limit
LIMITS = {"prompt-fills-limit": (MAX_LEN - 1, 1), "prompt-at-limit": (MAX_LEN, 1), "prompt-over": (MAX_LEN + 1, 1),
          "max-tokens-to-limit": (MAX_LEN - 100, 100), "max-tokens-over": (MAX_LEN - 100, 101),
          "no-max-tokens-at-limit": (MAX_LEN, None)}


@pytest.mark.parametrize("case", LIMITS)
def test_model_length_limits(servers, text_ids, case):
    length, max_tokens = LIMITS[case]
    body = {**GREEDY, "max_tokens": max_tokens}
    cls = assert_same_class(both(servers, prompt=text_ids[:length], **body))
    if case in ("prompt-fills-limit", "max-tokens-to-limit"):
        assert cls == ("ok", 1, (("length", max_tokens),))


def test_n_greater_than_one(servers, text_ids):
    got = both(servers, prompt=text_ids[:100], n=3, temperature=0.8, seed=7, max_tokens=12, ignore_eos=True,
               return_token_ids=True)
    assert assert_same_class(got) == ("ok", 3, (("length", 12),) * 3)


def test_n_greater_than_one_greedy(servers, text_ids):
    got = both(servers, prompt=text_ids[:100], n=2, **GREEDY)
    if assert_same_class(got)[0] == "ok":
        a, b = (c["token_ids"] for c in got["dar"].json()["choices"])
        assert a == b


def test_logprobs_and_prompt_logprobs(servers, text_ids):
    prompt = text_ids[:80]
    got = both(servers, prompt=prompt, logprobs=3, prompt_logprobs=2, **GREEDY)
    assert assert_same_class(got) == ("ok", 1, (("length", 8),))
    for r in got.values():
        choice = r.json()["choices"][0]
        assert len(choice["logprobs"]["token_logprobs"]) == 8
        assert all(len(top) >= 1 for top in choice["logprobs"]["top_logprobs"])
        assert len(choice["prompt_logprobs"]) == len(prompt) and choice["prompt_logprobs"][0] is None


def test_same_seed_same_text(servers, text_ids):
    body = {"prompt": text_ids[:90], "temperature": 1.0, "seed": 1234, "max_tokens": 16, "ignore_eos": True}
    for name, api in servers.items():
        first, second = api.complete(**body), api.complete(**body)
        assert first.status_code == second.status_code == 200, (name, first.text, second.text)
        assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"], name


def test_stop_strings(servers, text_ids):
    got = both(servers, prompt=text_ids[:70], temperature=0, max_tokens=64, stop=[" "], ignore_eos=True)
    classes = {n: (r.status_code, r.json()["choices"][0]["finish_reason"]) for n, r in got.items()}
    assert classes["dar"] == classes["stock"] == (200, "stop"), classes
    assert all(" " not in r.json()["choices"][0]["text"] for r in got.values())


def test_preemption_keeps_greedy_tokens(small_server, text_ids):
    """Six 40-token prompts decoding 200 tokens each, in a pool too small for all at full length: some are
    preempted (recomputed) and resumed, and every request's tokens equal those it gets alone."""
    api = small_server
    prompts = [text_ids[i * 40:(i + 1) * 40] for i in range(6)]
    body = {**GREEDY, "max_tokens": 200}
    before = api.metric("vllm:num_preemptions_total")
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: api.complete(prompt=p, **body), prompts))
    preemptions = api.metric("vllm:num_preemptions_total") - before
    alone = [api.complete(prompt=p, **body) for p in prompts]
    assert all(r.status_code == 200 for r in together + alone), [r.text[:300] for r in together + alone]
    assert preemptions > 0, f"no preemption: lower PREEMPT_BLOCKS\n{api.log.read_text()[-3000:]}"
    for t, a in zip(together, alone):
        assert t.json()["choices"][0]["token_ids"] == a.json()["choices"][0]["token_ids"]
