"""Conversion end to end on a tiny random Llama (shape-level), plus fitting and schedule properties."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import make_tiny_llama

from vllm_dar.checkpoint import load_dar, load_projections, save_projections
from vllm_dar.cli import main as cli
from vllm_dar.config import DarConfig, DarConfigError, ModelShape
from vllm_dar.convert import convert
from vllm_dar.convert.fit import fit_layer
from vllm_dar.convert.schedule import calibrated, pyramid

# The plain recipe these tests were written for (convert's defaults were, before they became the recommended one).
PLAIN = {"window": 64, "key_rank": 16, "value_rank": 16, "sink_tokens": 4, "schedule": "uniform",
         "head_sharing": "per_head"}


def run_convert(src, out, calib, **kw):
    return convert(src, str(out), calib_files=calib, calib_tokens=512, context=128, progress=False,
                   **{**PLAIN, **kw})


def test_convert_round_trip(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "dar"
    cfg = run_convert(tiny_llama, out, calib_text, window=8, key_rank=4, value_rank=6, sink_tokens=2)
    loaded, proj = load_dar(str(out))
    assert loaded.window == (8, 8) and loaded.key_rank == (4, 4) and loaded.value_rank == (6, 6)
    assert loaded.sink_tokens == 2 and cfg.kv_fraction(128) == loaded.kv_fraction(128)
    assert proj[0].q_proj.shape == (2, 16, 4) and proj[0].v_up.shape == (2, 6, 16)
    # The original weights are copied unchanged, and vLLM's top-level *.safetensors glob sees only them.
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]
    with open(os.path.join(tiny_llama, "model.safetensors"), "rb") as a, open(out / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    # Write-load round trip is exact.
    save_projections(str(tmp_path / "p.safetensors"), proj)
    again = load_projections(str(tmp_path), DarConfig(**{**loaded.__dict__, "projection_file": "p.safetensors"}))
    for x, y in zip(proj, again):
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("q_proj", "k_down", "v_down", "v_up"))


def test_cli_eval_and_generate(tiny_llama, calib_text, tmp_path, capsys):
    out = tmp_path / "dar"
    run_convert(tiny_llama, out, calib_text, window=4, key_rank=4, value_rank=4, method="qk",
                head_sharing="joint")
    assert cli(["eval", str(out), "--text", *calib_text, "--context", "64", "--max-windows", "2", "--json",
                "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 126 and res["perplexity"] > 1 and 0 < res["kv_fraction"] < 1
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def fibonacci(n):")
    assert cli(["generate", str(out), "--prompt-file", str(prompt), "--max-tokens", "5", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert len(gen["token_ids"]) == 5 and isinstance(gen["text"], str)


def test_bad_settings_fail_before_work_and_leave_nothing(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "dar"
    for kw, field in ((dict(key_rank=17), "dar.key_rank"), (dict(value_rank=0), "dar.value_rank"),
                      (dict(window=-1), "dar.window"), (dict(method="svd"), "--method"),
                      (dict(schedule="zigzag"), "--schedule"), (dict(kv_budget=1.5, schedule="calibrated"),
                                                                 "--kv-budget")):
        with pytest.raises(DarConfigError, match=field):
            run_convert(tiny_llama, out, calib_text, **kw)
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".convert-")]


def test_existing_out_is_kept(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "dar"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        run_convert(tiny_llama, out, calib_text)
    assert (out / "keep").read_text() == "x"


def test_cli_reports_errors(tiny_llama, tmp_path, capsys):
    assert cli(["convert", tiny_llama, str(tmp_path / "o"), "--key-rank", "99"]) == 2
    assert "dar.key_rank" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_other_llama_family(default_model, calib_text, tmp_path, arch):
    src = make_tiny_llama(str(tmp_path / arch), default_model, arch=arch, layers=1)
    cfg = run_convert(src, tmp_path / "dar", calib_text, window=4, key_rank=4, value_rank=4)
    assert cfg.shape.num_layers == 1


def test_unsupported_architecture(tmp_path, calib_text):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "g")
    with pytest.raises(DarConfigError, match="GPT2LMHeadModel"):
        run_convert(str(tmp_path / "g"), tmp_path / "o", calib_text)
    assert not (tmp_path / "o").exists()


@pytest.fixture()
def converted(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "dar"
    run_convert(tiny_llama, out, calib_text, window=8, key_rank=4, value_rank=4)
    return out


def test_corrupt_projection_file(converted):
    (converted / "dar" / "projections.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DarConfigError, match="not a readable safetensors"):
        load_dar(str(converted))


def test_missing_projection_file(converted):
    shutil.rmtree(converted / "dar")
    with pytest.raises(DarConfigError, match="does not exist"):
        load_dar(str(converted))


def test_projection_shape_mismatch(converted):
    raw = json.loads((converted / "config.json").read_text())
    raw["dar"]["key_rank"] = [5, 5]  # the file holds rank 4
    (converted / "config.json").write_text(json.dumps(raw))
    with pytest.raises(DarConfigError, match=r"layers.0.q_proj has shape \(2, 16, 4\).*\(2, 16, 5\)"):
        load_dar(str(converted))


def test_pca_fit_recovers_low_rank_keys():
    """Keys living in a 3-dim subspace are reproduced exactly at rank 3."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 3, generator=gen))[0]  # [8, 3]
    k = torch.randn(500, 3, generator=gen) @ basis.T  # [N, 8]
    q = torch.randn(500, 8, generator=gen)
    c = lambda x: (x.T @ x / len(x)).unsqueeze(0)
    for method in ("pca", "qk"):
        fit = fit_layer(c(q), c(k), c(k), torch.eye(8).unsqueeze(0), head_dim=8, method=method, reg=0.0)
        p = fit.at(3, 3)
        scores = (q @ p.q_proj[0]) @ (k @ p.k_down[0]).T
        torch.testing.assert_close(scores, q @ k.T, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close((k @ p.v_down[0]) @ p.v_up[0], k, atol=1e-4, rtol=1e-4)


def test_pyramid_keeps_total_and_decreases():
    s = pyramid(30, window=64, key_rank=16, value_rank=12, max_rank=64)
    assert sum(x.key_rank for x in s) == 30 * 16 and sum(x.value_rank for x in s) == 30 * 12
    assert s[0].key_rank > s[-1].key_rank


def test_calibrated_meets_budget_and_prefers_sensitive_layers():
    windows, ranks = (16, 64), (4, 8, 16)
    cheap = (torch.tensor([[1.0, 0.5, 0.1], [0.9, 0.4, 0.05]]),) * 2
    costly = (torch.tensor([[100.0, 50.0, 10.0], [90.0, 40.0, 5.0]]),) * 2
    settings = calibrated([cheap, costly], windows=windows, ranks=ranks, groups=1, full_per_token=64,
                          context=256, sink_tokens=0, budget=0.5)
    cost = sum(((s.window * 64 / 256) + s.key_rank + s.value_rank) / 64 for s in settings) / 2
    assert cost <= 0.5
    assert settings[1].key_rank >= settings[0].key_rank


def test_layerwise_fit_lowers_the_output_error():
    from test_reference import qkv, random_proj

    from vllm_dar.convert.fit import refine_layer

    q, k, v = qkv(1, 4, 2, 64, 8)
    wo = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    proj = random_proj(2, 8, 2, 2)
    new, first, last = refine_layer(proj, (q[0], k[0], v[0]), wo, window=8, sink_tokens=1, steps=60,
                                    queries=32, lr=1e-2)
    assert last < 0.7 * first
    assert new.q_proj.shape == proj.q_proj.shape and not new.q_proj.requires_grad


def test_capture_hooks_always_come_off(tiny_llama):
    from vllm_dar.hf import _STATE, attention_modules, capture, load_model

    model, _ = load_model(tiny_llama, dtype="float32")
    before = model.config._attn_implementation
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, lambda i, q, k, v: seen.append((i, tuple(k.shape)))):
            model(torch.tensor([[1, 2, 3]]))
            raise RuntimeError("boom")
    assert seen == [(0, (1, 2, 3, 16)), (1, (1, 2, 3, 16))]  # post-RoPE keys of both layers were seen
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, _STATE) for m in attention_modules(model))


def test_defaults_are_the_recommended_recipe_in_one_place():
    """`vllm-dar convert SRC OUT` and `convert(SRC, OUT)` run the same recipe, Recipe()'s: the best measured
    without training (joint projections, calibrated windows and ranks at DEFAULT_KV_BUDGET, 4 sinks)."""
    import inspect

    from vllm_dar.cli import build_parser
    from vllm_dar.convert.recipe import DEFAULT, FIELDS, Recipe

    assert DEFAULT == Recipe(window=64, key_rank=48, value_rank=64, sink_tokens=4, schedule="calibrated",
                             method="pca", head_sharing="joint", kv_budget=None, context=2048, calib_tokens=16384)
    a = build_parser().parse_args(["convert", "in", "out"])
    params = inspect.signature(convert).parameters
    for f in FIELDS:
        assert getattr(a, f) == getattr(DEFAULT, f), f
        assert params[f].default == getattr(DEFAULT, f), f
    assert set(FIELDS) <= set(params)


def test_kv_budget_is_checked_before_work(tiny_llama, calib_text, tmp_path, capsys):
    out = tmp_path / "dar"
    # Defaults but the budget (the tiny model's joint width 32 is below the default ranks: unread with a budget).
    # The least budget at context 512: window 32 reserved as 7 blocks of 16 (sinks, two tails) at full width 64,
    # ranks 8/8 for every token: (7 * 16 * 64 + 512 * 16) / (512 * 64) = 0.4688.
    run = lambda **kw: convert(tiny_llama, str(out), calib_files=calib_text, calib_tokens=512, context=512,
                               progress=False, **kw)
    for kw, message in (({"kv_budget": 0.0}, r"--kv-budget: 0.0 must be in \(0, 1\]"),
                        ({"kv_budget": 1.5}, r"--kv-budget: 1.5 must be in \(0, 1\]"),
                        ({"kv_budget": 0.5, "schedule": "uniform"}, "--kv-budget: applies to --schedule calibrated"),
                        ({"kv_budget": 0.5, "window": 128}, r"--kv-budget: .*ignore \{'window': 128\}"),
                        ({"kv_budget": 0.3}, r"--kv-budget: 0.3 is below 0.4688"),
                        ({}, r"--kv-budget: 0.394 is below 0.4688")):  # the default budget, checked alike
        with pytest.raises(DarConfigError, match=message):
            run(**kw)
        assert not out.exists()
    assert cli(["convert", tiny_llama, str(out), "--kv-budget", "2"]) == 2
    assert "--kv-budget: 2.0 must be in (0, 1]" in capsys.readouterr().err


def test_calibrated_budget_is_the_given_budget_setting_or_default():
    from vllm_dar.config import PRICED_BLOCK_SIZE
    from vllm_dar.convert.recipe import DEFAULT_KV_BUDGET, Recipe

    shape = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    assert Recipe().calibrated_budget(shape) == DEFAULT_KV_BUDGET
    assert Recipe(kv_budget=0.25).calibrated_budget(shape) == 0.25
    given = Recipe(window=128, key_rank=48, value_rank=48)  # a uniform setting given: its reserved bytes
    expected = DarConfig.uniform(shape, window=128, key_rank=48, value_rank=48, sink_tokens=4,
                                 head_sharing="joint").reserved_fraction(2048, PRICED_BLOCK_SIZE)
    assert given.calibrated_budget(shape) == pytest.approx(expected) and expected != DEFAULT_KV_BUDGET


def test_plan_prices_the_served_cache_dtypes(tiny_llama, calib_text):
    """``plan(kv_cache_dtype="fp8", dtype=D)`` spends the budget on the bytes ``vllm serve --kv-cache-dtype fp8
    --dtype D`` stores (far elements at one byte beside D's window elements; ``benchmarks/fp8_recipe.py``),
    records that in ``extra``, and refuses dtypes it cannot price."""
    from vllm_dar.config import PRICED_BLOCK_SIZE
    from vllm_dar.convert import calibrate_model, plan, priced_itemsizes

    assert priced_itemsizes("auto", "float32") == (1, 1) and priced_itemsizes("fp8", "bfloat16") == (2, 1)
    assert priced_itemsizes("fp8_e5m2", "float32") == (4, 1)
    for args, message in ((("int8", "bfloat16"), "kv_cache_dtype: 'int8' is not one of"),
                          (("fp8", "half"), "dtype: 'half' is not one of")):
        with pytest.raises(DarConfigError, match=message):
            priced_itemsizes(*args)
    model, stats, _ = calibrate_model(tiny_llama, calib_files=calib_text, calib_tokens=512, context=512,
                                      sink_tokens=4, progress=False)
    shape = ModelShape.from_hf_config(model.config)
    kw = {"window": 64, "key_rank": 16, "value_rank": 16, "sink_tokens": 4, "schedule": "calibrated",
          "head_sharing": "joint", "kv_budget": 0.6, "context": 512, "progress": False}
    plain, _ = plan(shape, stats, **kw)
    fp8, proj = plan(shape, stats, kv_cache_dtype="fp8", dtype="float32", **kw)
    spent = fp8.reserved_fraction(512, PRICED_BLOCK_SIZE, 4, 1)
    assert 0.5 < spent <= 0.6 and fp8.extra["priced_for"] == {"kv_cache_dtype": "fp8", "dtype": "float32"}
    assert "priced_for" not in plain.extra and 0.5 < plain.reserved_fraction(512) <= 0.6
    assert fp8.reserved_fraction(512) > 0.6  # priced in the model dtype it overspends: it bought cheap far bytes
    assert fp8.far_elems_per_token() > plain.far_elems_per_token()
    assert len(proj) == shape.num_layers


def test_kv_budget_alone_gives_a_calibrated_joint_model(tiny_llama, calib_text, tmp_path):
    cfg = convert(tiny_llama, str(tmp_path / "dar"), kv_budget=0.6, calib_files=calib_text, calib_tokens=512,
                  context=512, progress=False)
    assert cfg.head_sharing == "joint" and cfg.sink_tokens == 4 and cfg.extra["schedule"] == "calibrated"
    # The budget counts windows as vLLM reserves them; the layout holds less.
    assert 0.5 < cfg.reserved_fraction(512) <= 0.6 and cfg.kv_fraction(512) < cfg.reserved_fraction(512)
    assert cfg.extra["reserved_fraction_at_context"] == round(cfg.reserved_fraction(512), 4)
    assert load_dar(str(tmp_path / "dar"))[0].kv_fraction(512) == cfg.kv_fraction(512)


def test_cli_train_domains_pick_the_calibration_text(tiny_llama, tmp_path, capsys, monkeypatch):
    """``--train-domains`` calibrates (convert) and trains (heal) on the training parts of those text domains,
    interleaved file by file (``vllm_dar.data.mixed_train_files``); with ``--calib`` too it is refused before any
    work."""
    from vllm_dar.checkpoint import read_config
    from vllm_dar.data import domain_split, mixed_train_files

    out = tmp_path / "o"
    flags = ["--window", "8", "--key-rank", "4", "--value-rank", "4", "--schedule", "uniform", "--calib-tokens",
             "512", "--context", "256", "--quiet"]
    assert cli(["convert", tiny_llama, str(out), "--train-domains", "code", "release-notes", *flags]) == 0
    files = read_config(str(out))["dar"]["extra"]["calib_files"]
    want = [os.path.basename(f) for f in mixed_train_files(["code", "release-notes"])]
    assert files == want[:len(files)] and files[:2] == [os.path.basename(domain_split(d)[0][0])
                                                        for d in ("code", "release-notes")]
    assert cli(["convert", tiny_llama, str(tmp_path / "p"), "--train-domains", "code", "--calib", files[0],
                *flags]) == 2
    assert "not both" in capsys.readouterr().err and not (tmp_path / "p").exists()
    import vllm_dar.heal

    got = {}
    monkeypatch.setattr(vllm_dar.heal, "heal", lambda *a, calib_files=None, **kw: got.update(files=calib_files) or {})
    assert cli(["heal", str(out), str(tmp_path / "h"), "--max-tokens", "4096", "--train-domains", "code",
                "release-notes"]) == 0
    assert got["files"] == mixed_train_files(["code", "release-notes"])
    assert cli(["heal", str(out), str(tmp_path / "h"), "--max-tokens", "4096", "--train-domains", "code", "--calib",
                files[0]]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # never trained on: not a choice
        cli(["heal", str(out), str(tmp_path / "h"), "--max-tokens", "512", "--train-domains", "licenses"])
    assert "invalid choice" in capsys.readouterr().err
