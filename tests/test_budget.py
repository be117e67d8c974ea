"""Per-layer token budgets (PyramidKV/SnapKV on DAR's far cache): the ``budget`` section, its schedules and byte
counts by hand, the dense reference's selection and eviction, exactness of teacher-forced continuation scoring
against prefill-then-decode, and the ``vllm-dar budget`` command."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vllm_dar.checkpoint import load_dar, set_budget
from vllm_dar.cli import main as cli
from vllm_dar.config import BudgetConfig, DarConfig, DarConfigError, ModelShape, parse_budget
from vllm_dar.reference import LayerProjections, dar_attention, dar_attention_sdpa, select_kept

SHAPE = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)


def random_proj(j=2, d=16, rk=6, rv=6, groups=2, seed=0) -> LayerProjections:
    g = torch.Generator().manual_seed(seed)
    dg = d * j // groups
    return LayerProjections(q_proj=torch.randn(j, d, rk, generator=g) / d ** 0.5,
                            k_down=torch.randn(groups, dg, rk, generator=g) / dg ** 0.5,
                            v_down=torch.randn(groups, dg, rv, generator=g) / dg ** 0.5,
                            v_up=torch.randn(j, rv, d, generator=g) / rv ** 0.5)


# ---------------------------------------------------------------- the section

def test_section_round_trips_and_errors_name_the_field():
    b = BudgetConfig.make(0.25, 4, schedule="pyramid", beta=5.0, observation_window=8, pooling="avg", pool_kernel=3)
    cfg = DarConfig.uniform(SHAPE, window=8, key_rank=4, value_rank=4, sink_tokens=2, budget=b)
    again = DarConfig.from_json(json.loads(json.dumps(cfg.to_json())), SHAPE)
    assert again == cfg and again.budget.per_layer == b.per_layer
    good = cfg.to_json()
    bad = {
        "kind": ("bytes", "dar.budget.kind"),
        "per_layer": ([0.1, 0.1], "dar.budget.per_layer: expected a list of 4"),
        "observation_window": (0, "dar.budget.observation_window"),
        "pooling": ("median", "dar.budget.pooling"),
        "pool_kernel": (4, "dar.budget.pool_kernel"),
        "schedule": ("random", "dar.budget.schedule"),
        "mean": (-1, "dar.budget.mean"),
    }
    for field, (value, message) in bad.items():
        section = {**good, "budget": {**good["budget"], field: value}}
        with pytest.raises(DarConfigError, match=message.replace("[", r"\[")):
            DarConfig.from_json(section, SHAPE)
    for values, message in (([0.1, 0.2, 1.5, 0.1], r"per_layer\[2\]: 1.5 must be a fraction"),
                            ([0.1, float("nan"), 0.1, 0.1], r"per_layer\[1\]"),
                            ([0.1, True, 0.1, 0.1], r"per_layer\[1\]")):
        with pytest.raises(DarConfigError, match=message):
            DarConfig.from_json({**good, "budget": {**good["budget"], "per_layer": values}}, SHAPE)
    tokens = {**good["budget"], "kind": "tokens", "per_layer": [8, 8, 2.5, 8]}
    with pytest.raises(DarConfigError, match=r"per_layer\[2\]: 2.5 must be an integer"):
        DarConfig.from_json({**good, "budget": tokens}, SHAPE)
    with pytest.raises(DarConfigError, match=r"dar.budget: unknown field\(s\) \['size'\]"):
        DarConfig.from_json({**good, "budget": {**good["budget"], "size": 3}}, SHAPE)
    with pytest.raises(DarConfigError, match="dar.budget: expected an object"):
        DarConfig.from_json({**good, "budget": [0.1]}, SHAPE)


def test_pyramid_schedule_by_hand():
    # PyramidKV: bottom 2 m - m / beta, top m / beta, linear; the mean is m.
    b = BudgetConfig.make(0.1, 5, schedule="pyramid", beta=20.0)
    assert b.kind == "fraction" and b.per_layer == pytest.approx((0.195, 0.1475, 0.1, 0.0525, 0.005))
    assert sum(b.per_layer) / 5 == pytest.approx(0.1)
    # A top above 1 is capped: 1 at the bottom, 2 m - 1 at the top.
    assert BudgetConfig.make(0.75, 3, schedule="pyramid").per_layer == pytest.approx((1.0, 0.75, 0.5))
    assert BudgetConfig.make(0.1, 3, schedule="uniform").per_layer == (0.1, 0.1, 0.1)
    tokens = BudgetConfig.make(100, 3, schedule="pyramid", beta=4.0)  # 175, 100, 25
    assert tokens.kind == "tokens" and tokens.per_layer == (175, 100, 25)
    with pytest.raises(DarConfigError, match="--token-budget"):
        BudgetConfig.make(1.5, 3)
    with pytest.raises(DarConfigError, match="--budget-beta"):
        BudgetConfig.make(0.1, 3, beta=0.5)


def test_parse_budget():
    assert parse_budget("0.1") == 0.1 and isinstance(parse_budget("0.1"), float)
    assert parse_budget("512") == 512 and isinstance(parse_budget("512"), int)
    assert parse_budget("0") == 0.0 and isinstance(parse_budget("0"), float)  # no candidate kept
    assert parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)  # every candidate
    for text in ("1.5", "-0.1", "ten", "nan"):
        with pytest.raises(DarConfigError, match="--token-budget"):
            parse_budget(text)


def test_candidates_kept_and_bytes_by_hand():
    b = BudgetConfig(kind="fraction", per_layer=(0.5, 0.25, 0.0, 1.0), observation_window=8)
    # Window 8 keeps the last 7 prompt positions at full width; W = 8 > 7 protects 8. Sinks 2.
    assert b.protected(8) == 8 and b.protected(32) == 31
    assert b.candidates(100, 8, 2) == 90 and b.candidates(9, 8, 2) == 0
    assert [b.kept(i, 90) for i in range(4)] == [45, 23, 0, 90]  # floor(f n + 1/2): 22.5 -> 23
    t = BudgetConfig(kind="tokens", per_layer=(10, 10, 200, 0))
    assert [t.kept(i, 90) for i in range(4)] == [10, 10, 90, 0]
    cfg = DarConfig.uniform(SHAPE, window=8, key_rank=4, value_rank=4, sink_tokens=2, budget=b)
    plain = DarConfig.uniform(SHAPE, window=8, key_rank=4, value_rank=4, sink_tokens=2)
    # per layer: 2 groups x (4 + 4) reduced elements per position; exact budgets evict 45, 67, 90, 0 positions
    assert cfg.evicted_positions(100, [1] * 4) == [45, 67, 90, 0]
    # served: a far block holds a window page's bytes, 16 slots of 64 elements = 64 reduced slots of 16 (16 x 4,
    # 4 divides 48); candidates [2, 92); s0 = (92 - kept) // 64 * 64: 47 -> 0 (no whole block to free: keep
    # all), 69 -> 64, 92 -> 64 (budget 0 still keeps the partial block's 28), 2 -> 0
    assert cfg.far_block_tokens() == [64] * 4
    assert [b.kept_span(i, 100, 8, 2, 64) for i in range(4)] == [(0, 92), (64, 92), (64, 92), (0, 92)]
    assert cfg.evicted_positions(100) == [0, 62, 62, 0]
    assert plain.kv_elems(100) - cfg.kv_elems(100) == 124 * 16
    assert cfg.kv_bytes_per_token(100, 2) == pytest.approx((plain.kv_elems(100) - 124 * 16) * 2 / 100)
    # a decode step at 100 tokens reads the same number fewer far elements
    assert plain.decode_bytes(100, 2).dar - cfg.decode_bytes(100, 2).dar == 124 * 16 * 2


# ---------------------------------------------------------------- selection and eviction (reference)

def test_selection_keeps_the_attended_candidates_per_group():
    torch.manual_seed(0)
    b_, h, j, d, p = 1, 4, 2, 16, 40
    proj = random_proj(j, d, rk=16, rv=6, groups=2)
    q = torch.randn(b_, h, p, d) * 0.1
    k = torch.randn(b_, j, p, d) * 0.1
    budget = BudgetConfig(kind="tokens", per_layer=(3,), observation_window=4, pool_kernel=1)
    # Plant one candidate per group that the observation queries of that group's heads score highly.
    qr_dir = torch.randn(d)
    q[:, :, -4:] += qr_dir * 2
    k[:, 0, 10] += qr_dir * 3  # group 0 (KV head 0): position 10
    evicted = select_kept(q, k, proj, budget, 0, window=8, sink_tokens=2, prompt_len=p, scale=1.0)
    n = budget.candidates(p, 8, 2)  # [2, 40 - 8) = 30 candidates
    assert evicted.shape == (1, 2, p)
    assert not evicted[..., :2].any() and not evicted[..., 2 + n:].any()  # sinks and the protected tail
    assert (evicted[..., 2:2 + n].sum(-1) == n - 3).all()  # exactly 3 kept per group
    # the planted key of group 0 is kept when its reduced score is the highest
    qr = (q[0, :2, -4:] @ proj.q_proj[0]).reshape(-1, 16)  # heads 0-1 read KV head 0's map
    kr = k[0, 0] @ proj.k_down[0]  # per-head groups: group 0 is KV head 0
    score = torch.softmax(qr @ kr[2:2 + n].T, -1).sum(0)
    assert not evicted[0, 0, 2 + int(score.argmax())]
    # keep everything / nothing
    every = BudgetConfig(kind="fraction", per_layer=(1.0,), observation_window=4)
    assert not select_kept(q, k, proj, every, 0, window=8, sink_tokens=2, prompt_len=p).any()
    none = BudgetConfig(kind="fraction", per_layer=(0.0,), observation_window=4)
    ev = select_kept(q, k, proj, none, 0, window=8, sink_tokens=2, prompt_len=p)
    assert ev[..., 2:2 + n].all() and ev.sum() == 2 * n


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_eviction_hides_candidates_from_later_queries_only(pooling):
    torch.manual_seed(1)
    b_, h, j, d, t, p = 1, 4, 2, 16, 64, 40
    for groups in (1, 2):
        proj = random_proj(j, d, rk=5, rv=7, groups=groups)
        q, k, v = torch.randn(b_, h, t, d), torch.randn(b_, j, t, d), torch.randn(b_, j, t, d)
        budget = BudgetConfig(kind="fraction", per_layer=(0.3,), observation_window=6, pooling=pooling,
                              pool_kernel=5)
        evicted = select_kept(q, k, proj, budget, 0, window=8, sink_tokens=2, prompt_len=p, scale=0.3)
        want = dar_attention(q, k, v, proj, window=8, sink_tokens=2, scale=0.3, evicted=evicted, prompt_len=p)
        got = dar_attention_sdpa(q, k, v, proj, window=8, sink_tokens=2, scale=0.3, evicted=evicted,
                                 prompt_len=p, chunk=16)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        plain = dar_attention(q, k, v, proj, window=8, sink_tokens=2, scale=0.3)
        torch.testing.assert_close(want[:, :, :p], plain[:, :, :p])  # the prompt saw everything
        assert (want[:, :, p:] - plain[:, :, p:]).abs().amax() > 1e-3  # the continuation did not
        # By hand for one continuation query: attention over the kept set only.
        full, red = torch.zeros(t, dtype=torch.bool), torch.zeros(t, dtype=torch.bool)
        tq = t - 1
        full[:2], full[tq - 7:] = True, True
        red[2:tq - 7] = True
        head = 1 if groups == 2 else 3  # groups 2: KV head 0; joint: KV head 1
        g = 0  # groups 2: KV head 0's group; joint: the one group
        gone = torch.zeros(t, dtype=torch.bool)
        gone[:p] = evicted[0, g]
        red &= ~gone
        jh = head // (h // j)
        kg = torch.cat([k[0, i] for i in range(j)], -1) if groups == 1 else k[0, jh]
        vg = torch.cat([v[0, i] for i in range(j)], -1) if groups == 1 else v[0, jh]
        s_full = q[0, head, tq] @ k[0, jh].T * 0.3
        s_red = (q[0, head, tq] @ proj.q_proj[jh]) @ (kg @ proj.k_down[g]).T * 0.3
        s = torch.where(full, s_full, torch.where(red, s_red, torch.tensor(-math.inf)))
        pr = torch.softmax(s, -1)
        out = pr[full] @ v[0, jh][full] + (pr[red] @ (vg @ proj.v_down[g])[red]) @ proj.v_up[jh]
        torch.testing.assert_close(want[0, head, tq], out, atol=1e-5, rtol=1e-5)


def test_teacher_forced_continuation_equals_prefill_then_decode(tiny_dar):
    """``perplexity(prefix=P)``'s one pass gives the logits prefill-then-decode gives, token by token."""
    from transformers import DynamicCache

    from vllm_dar.hf import dar_attention_enabled, load_model

    model, _ = load_model(tiny_dar, dtype="float32")
    cfg, proj = load_dar(tiny_dar)
    cfg = DarConfig(**{**cfg.__dict__, "budget": BudgetConfig.make(0.2, cfg.shape.num_layers, observation_window=4,
                                                                   pool_kernel=3)})
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 100))
    p = 80  # layer 0 keeps 28 of 71 candidates [2, 73), served [32, 73): 41; layer 1 keeps 1 of them
    with torch.no_grad(), dar_attention_enabled(model, cfg, proj, prompt_len=p):
        once = model(ids, use_cache=False).logits[0, p - 1:].float()
    steps = []
    with torch.no_grad(), dar_attention_enabled(model, cfg, proj):
        cache = DynamicCache(config=model.config)
        steps.append(model(ids[:, :p], past_key_values=cache, use_cache=True).logits[0, -1])
        for i in range(p, 100):
            steps.append(model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    torch.testing.assert_close(torch.stack(steps[:-1]).float(), once[:-1], atol=1e-4, rtol=1e-4)
    with torch.no_grad(), dar_attention_enabled(model, DarConfig(**{**cfg.__dict__, "budget": None}), proj):
        plain = model(ids, use_cache=False).logits[0, p - 1:].float()
    assert (plain[1:] - once[1:]).abs().amax() > 1e-4  # eviction changed the continuation


def test_budget_scoring_needs_a_prefix(tiny_dar):
    from vllm_dar.evaluate import load_for_eval, perplexity

    model, _, cfg, proj = load_for_eval(tiny_dar, "float32")
    cfg = DarConfig(**{**cfg.__dict__, "budget": BudgetConfig.make(0.5, cfg.shape.num_layers)})
    windows = [list(range(100, 164))]
    with pytest.raises(ValueError, match="--prefix"):
        perplexity(model, windows, cfg=cfg, projections=proj, progress=False)
    with pytest.raises(ValueError, match="longer than the prefix"):
        perplexity(model, windows, cfg=cfg, projections=proj, progress=False, prefix=64)
    res = perplexity(model, windows, cfg=cfg, projections=proj, progress=False, prefix=48)
    assert res["tokens"] == 16


# ---------------------------------------------------------------- the command

def test_budget_command_sets_and_clears_in_place(tiny_dar, tmp_path, capsys):
    import shutil

    model = str(tmp_path / "m")
    shutil.copytree(tiny_dar, model)
    before = {n: os.path.getmtime(os.path.join(model, n)) for n in os.listdir(model) if n != "config.json"}
    assert cli(["budget", model, "--token-budget", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg, _ = load_dar(model)
    assert cfg.budget.kind == "fraction" and cfg.budget.schedule == "pyramid" and cfg.budget.mean == 0.1
    assert out["per_layer"] == list(cfg.budget.per_layer)
    assert {n: os.path.getmtime(os.path.join(model, n)) for n in before} == before  # nothing else rewritten
    assert cli(["budget", model, "--token-budget", "16", "--budget-schedule", "uniform"]) == 0
    cfg, _ = load_dar(model)
    assert cfg.budget.kind == "tokens" and set(cfg.budget.per_layer) == {16}
    with open(os.path.join(model, "config.json")) as f:
        kept = f.read()
    for bad in (["--token-budget", "2.5"], ["--token-budget", "0.1", "--pool-kernel", "4"], [],
                ["--token-budget", "0.1", "--clear"]):
        assert cli(["budget", model, *bad]) == 2
        with open(os.path.join(model, "config.json")) as f:
            assert f.read() == kept  # a refused change loses nothing
    assert "pool_kernel" in capsys.readouterr().err
    assert cli(["budget", model, "--clear"]) == 0
    assert load_dar(model)[0].budget is None
    assert not [n for n in os.listdir(model) if n.endswith(".tmp")]


def test_budget_command_refuses_a_stock_model(tiny_llama, capsys):
    assert cli(["budget", tiny_llama, "--token-budget", "0.1"]) == 2
    assert "no dar section" in capsys.readouterr().err


def test_set_budget_validates_against_the_model(tiny_dar, tmp_path):
    import shutil

    model = str(tmp_path / "m")
    shutil.copytree(tiny_dar, model)
    with pytest.raises(DarConfigError, match="dar.budget.per_layer: 5 values"):
        set_budget(model, BudgetConfig.make(0.1, 5))
    assert load_dar(model)[0].budget is None
