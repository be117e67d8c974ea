"""Healing fine-tune on a tiny random Llama: the loss falls, resume continues the same run, the output is an
ordinary DAR-converted checkpoint with changed projections (and, with ``--weights``, changed attention weights and
nothing else), bad input fails clearly."""
from __future__ import annotations

import os

import pytest
import torch

from vllm_dar.checkpoint import load_dar
from vllm_dar.cli import main as cli
from vllm_dar.config import DarConfigError
from vllm_dar.convert import convert
from vllm_dar.heal import STATE_FILE, HealSettings, averaged_steps, distill_loss, heal, heal_projections
from vllm_dar.hf import load_model

CTX = 64


@pytest.fixture(scope="module")
def dar_tiny(tiny_llama, calib_text, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("heal") / "dar")
    convert(tiny_llama, out, window=8, key_rank=2, value_rank=2, sink_tokens=1, schedule="uniform",
            head_sharing="per_head", calib_files=calib_text, calib_tokens=256, context=CTX, progress=False)
    return out


def settings(**kw) -> HealSettings:
    return HealSettings(**{"context": CTX, "max_tokens": 4 * CTX, "lr": 1e-2, "warmup_steps": 1,
                           "save_every": 1, "data_tokens": 8 * CTX, **kw})


def projections_equal(a, b) -> bool:
    return all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b)
               for f in ("q_proj", "k_down", "v_down", "v_up"))


def test_loss_decreases(dar_tiny, calib_text):
    from vllm_dar.data import token_windows

    model, tok = load_model(dar_tiny, dtype="float32")
    cfg, proj = load_dar(dar_tiny)
    windows = token_windows(tok, calib_text, context=CTX, max_windows=2)
    probe = torch.tensor([windows[0]])  # [1, T]: the same batch before and after training
    with torch.no_grad():
        before, _ = distill_loss(model, probe, cfg, proj)
    healed, state, finished = heal_projections(model, cfg, proj, windows, settings(max_tokens=12 * CTX),
                                               progress=False)
    with torch.no_grad():
        after, _ = distill_loss(model, probe, cfg, healed)
    assert finished and state["step"] == 12 and state["tokens"] == 12 * CTX
    assert float(after) < 0.7 * float(before), (float(before), float(after))
    assert not any(p.requires_grad for p in model.parameters())  # model weights stay frozen


def test_distill_loss_is_kl_and_lm_of_the_affected_positions(dar_tiny, calib_text):
    """distill_loss on a batch of 2 equals the plain formula: KL(full || DAR) per position from the first affected
    one, averaged over positions and batch rows, plus the LM loss of each row's next tokens there."""
    from vllm_dar.data import token_windows
    from vllm_dar.heal import first_affected
    from vllm_dar.hf import dar_attention_enabled

    model, tok = load_model(dar_tiny, dtype="float32")
    cfg, proj = load_dar(dar_tiny)
    ids = torch.tensor(token_windows(tok, calib_text, context=CTX, max_windows=2))  # [2, T]
    start = first_affected(cfg)
    with torch.no_grad():
        got, m = distill_loss(model, ids, cfg, proj, kl_weight=0.7, lm_weight=0.3)
        t_logp = torch.log_softmax(model(ids).logits[:, start:], -1)
        with dar_attention_enabled(model, cfg, proj):
            s_logits = model(ids).logits[:, start:]
    s_logp = torch.log_softmax(s_logits, -1)
    kl = torch.nn.functional.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True,
                                    reduction="batchmean")
    lm = torch.nn.functional.cross_entropy(s_logits[:, :-1].flatten(0, 1), ids[:, start + 1:].flatten())
    assert m["kl"] == pytest.approx(float(kl), rel=1e-4) and m["lm"] == pytest.approx(float(lm), rel=1e-4)
    assert float(got) == pytest.approx(0.7 * float(kl) + 0.3 * float(lm), rel=1e-4)


def test_projections_only_runs_resume_whatever_weight_lr(dar_tiny, calib_text, tmp_path):
    """--weight-lr is fixed by resume only when weights are trained: a projections-only run saved under the old
    default (1e-4) resumes under the new one."""
    out = str(tmp_path / "run")
    heal(dar_tiny, out, settings=settings(weight_lr=1e-4), calib_files=calib_text, progress=False,
         on_step=lambda m: True)
    summary = heal(dar_tiny, out, settings=settings(), calib_files=calib_text, progress=False, resume=True)
    assert summary["finished"]
    heal(dar_tiny, str(tmp_path / "w"), settings=settings(weights="q", weight_lr=1e-4), calib_files=calib_text,
         progress=False, on_step=lambda m: True)
    with pytest.raises(DarConfigError, match="--weight-lr"):
        heal(dar_tiny, str(tmp_path / "w"), settings=settings(weights="q"), calib_files=calib_text,
             progress=False, resume=True)


def test_runs_saved_before_averaging_resume_without_it(dar_tiny, calib_text, tmp_path):
    """A run state saved before --average-tail existed averaged nothing: it resumes under the default (0) and
    refuses --average-tail 0.25 rather than averaging a tail it only partly saw."""
    out = str(tmp_path / "run")
    heal(dar_tiny, out, settings=settings(), calib_files=calib_text, progress=False, on_step=lambda m: True)
    path = os.path.join(out, STATE_FILE)
    state = torch.load(path, weights_only=False)
    del state["run"]["average_tail"]
    torch.save(state, path)
    with pytest.raises(DarConfigError, match="--average-tail: 0.25 differs"):
        heal(dar_tiny, out, settings=settings(average_tail=0.25), calib_files=calib_text, progress=False,
             resume=True)
    summary = heal(dar_tiny, out, settings=settings(), calib_files=calib_text, progress=False, resume=True)
    assert summary["finished"] and summary["averaged_steps"] == 0


@pytest.mark.parametrize("tail,averaged", [(0.5, [3, 4, 5, 6]), (0.0, [])])
def test_output_is_the_mean_of_the_tail(dar_tiny, calib_text, tail, averaged):
    """--average-tail: the output projections and trained weights are the mean of the iterates after each step
    whose budget fraction is in the tail (6 steps, tail 0.5: steps 3-6); with 0, the last step's."""
    import copy

    from vllm_dar.data import token_windows

    model, tok = load_model(dar_tiny, dtype="float32")
    cfg, proj = load_dar(dar_tiny)
    windows = token_windows(tok, calib_text, context=CTX, max_windows=3)
    saves = []
    healed, state, finished = heal_projections(
        model, cfg, proj, windows, settings(max_tokens=6 * CTX, average_tail=tail, weights="qk", weight_lr=3e-3),
        progress=False, save=lambda s: saves.append(copy.deepcopy({k: s[k] for k in ("params", "weights")})))
    assert finished and len(saves) == 7  # after each step, then at the end
    steps = [saves[i - 1] for i in (averaged or [6])]
    want = {g: {k: torch.stack([s[g][k] for s in steps]).mean(0) for k in steps[0][g]} for g in steps[0]}
    assert averaged_steps(state) == len(averaged)
    got = {f"{f}.{i}": getattr(p, f) for i, p in enumerate(healed) for f in ("q_proj", "k_down", "v_down", "v_up")}
    for k, v in got.items():
        torch.testing.assert_close(v, want["params"][k], rtol=1e-5, atol=1e-6)
    live = model.state_dict()
    assert sorted(want["weights"]) == sorted(k for k in live if k.endswith(("q_proj.weight", "k_proj.weight")))
    for k, v in want["weights"].items():
        torch.testing.assert_close(live[k], v, rtol=1e-5, atol=1e-6)
    # The run state keeps the last step's parameters (with their Adam moments) for a resume to continue from.
    assert all(torch.equal(saves[-1][g][k], saves[5][g][k]) for g in saves[5] for k in saves[5][g])
    if averaged:  # the mean differs from the last step's
        assert not torch.allclose(want["params"]["k_down.0"], steps[-1]["params"]["k_down.0"])


def test_resuming_a_finished_run(dar_tiny, calib_text, tmp_path):
    """A finished run resumed under its budget (tokens or time) trains no further and writes the same output;
    under a larger budget it continues from its last step and averages the new tail only."""
    for bound in ({"max_tokens": 4 * CTX}, {"max_tokens": None, "max_minutes": 1e-4}):  # 1e-4 min: one step
        out = tmp_path / f"run{len(bound)}"
        run = settings(average_tail=0.5, weights="q", **bound)
        first = heal(dar_tiny, str(out), settings=run, calib_files=calib_text, progress=False)
        before = safetensors_dict(out / "dar" / "projections.safetensors")
        if "max_minutes" in bound:  # as real time-bound runs end: short of the budget, the next step would pass it
            path = out / "dar" / STATE_FILE
            state = torch.load(path, weights_only=False)
            state["seconds"] = 60 * bound["max_minutes"] * 0.99
            torch.save(state, path)
        again = heal(dar_tiny, str(out), settings=run, calib_files=calib_text, progress=False, resume=True)
        assert again["finished"] and again["steps"] == first["steps"], (first, again)
        after = safetensors_dict(out / "dar" / "projections.safetensors")
        assert all(torch.equal(v, after[k]) for k, v in before.items())
    longer = heal(dar_tiny, str(tmp_path / "run1"), settings=settings(average_tail=0.5, weights="q",
                  max_tokens=8 * CTX), calib_files=calib_text, progress=False, resume=True)
    # Steps 5-8: the new tail without the old one (steps 2-4 of 4); step 4, in the new tail too, ran before.
    assert longer["steps"] == 8 and longer["averaged_steps"] == 4


def test_resume_continues_the_same_run(dar_tiny, calib_text, tmp_path):
    straight = tmp_path / "straight"
    run = settings(average_tail=0.75)  # steps 1-4 averaged: the stop below falls inside the tail
    heal(dar_tiny, str(straight), settings=run, calib_files=calib_text, progress=False)
    parted = tmp_path / "parted"
    first = heal(dar_tiny, str(parted), settings=run, calib_files=calib_text, progress=False,
                 on_step=lambda m: m["step"] == 2)  # stop after step 2, as a crash would after its save
    assert not first["finished"] and first["steps"] == 2 and first["averaged_steps"] == 2
    assert os.listdir(parted) == [STATE_FILE]  # nothing but the run state until the run finishes
    second = heal(dar_tiny, str(parted), settings=run, calib_files=calib_text, progress=False, resume=True)
    assert second["finished"] and second["steps"] == 4 and second["tokens"] == 4 * CTX
    assert second["averaged_steps"] == 4
    # Same data order, Adam moments, schedule and running mean: the parted run ends where the straight one does.
    assert projections_equal(load_dar(str(straight))[1], load_dar(str(parted))[1])


def test_output_is_a_dar_checkpoint_with_new_projections(dar_tiny, calib_text, tmp_path, capsys):
    out = tmp_path / "healed"
    assert cli(["heal", dar_tiny, str(out), "--context", str(CTX), "--max-tokens", str(3 * CTX), "--lr", "1e-2",
                "--calib", *calib_text, "--quiet", "--json"]) == 0
    cfg, proj = load_dar(str(out))  # validates the dar section and every tensor's shape
    src_cfg, src_proj = load_dar(dar_tiny)
    assert cfg.window == src_cfg.window and cfg.key_rank == src_cfg.key_rank and cfg.method == "pca+heal"
    assert cfg.extra["heal"]["tokens"] == 3 * CTX
    assert not projections_equal(proj, src_proj)
    # Model weights are the source's, byte for byte; the run state sits where vLLM never looks.
    with open(os.path.join(dar_tiny, "model.safetensors"), "rb") as a, open(out / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert sorted(os.listdir(out / "dar")) == ["heal_state.pt", "projections.safetensors"]
    assert not [f for f in os.listdir(out) if f.endswith(".pt")]


def safetensors_dict(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_attention_weights(dar_tiny, calib_text, tmp_path):
    """--weights qk: the loss falls further than with projections alone in the same steps; the output carries the
    trained q/k weights and every other tensor byte for byte; a resumed run ends where the straight one does."""
    from vllm_dar.data import token_windows

    teacher, tok = load_model(dar_tiny, dtype="float32")
    cfg, proj = load_dar(dar_tiny)
    windows = token_windows(tok, calib_text, context=CTX, max_windows=2)
    probe = torch.tensor([windows[0]])
    losses = {}
    for letters in ("", "qk"):
        m = load_model(dar_tiny, dtype="float32")[0]
        healed, state, _ = heal_projections(m, cfg, proj, windows, settings(max_tokens=12 * CTX, weights=letters,
                                                                            weight_lr=3e-3), progress=False)
        with torch.no_grad():
            losses[letters] = float(distill_loss(m, probe, cfg, healed, teacher=teacher)[0])
        assert not any(p.requires_grad for p in m.parameters())
    assert sorted(state["weights"]) == sorted(f"model.layers.{i}.self_attn.{x}_proj.weight"
                                              for i in range(len(proj)) for x in "qk")
    assert losses["qk"] < 0.95 * losses[""], losses  # measured 0.92 (12 steps, tiny model)

    straight, parted = tmp_path / "straight", tmp_path / "parted"
    kw = {"settings": settings(weights="qk", weight_lr=3e-3), "calib_files": calib_text, "progress": False}
    heal(dar_tiny, str(straight), **kw)
    heal(dar_tiny, str(parted), **kw, on_step=lambda m: m["step"] == 2)
    heal(dar_tiny, str(parted), **kw, resume=True)
    src, out = safetensors_dict(os.path.join(dar_tiny, "model.safetensors")), safetensors_dict(
        straight / "model.safetensors")
    assert src.keys() == out.keys()
    changed = {k for k in src if not torch.equal(src[k], out[k])}
    assert changed == set(state["weights"]), changed
    resumed = safetensors_dict(parted / "model.safetensors")
    assert resumed.keys() == out.keys() and all(torch.equal(v, resumed[k]) for k, v in out.items())
    assert load_dar(str(straight))[0].extra["heal"]["settings"]["weights"] == "qk"
    reloaded = load_model(str(straight), dtype="float32")[0].state_dict()
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(reloaded[q0], out[q0])


def test_bad_input_fails_clearly(tiny_llama, dar_tiny, calib_text, tmp_path, capsys):
    with pytest.raises(DarConfigError, match="no dar section"):
        heal(tiny_llama, str(tmp_path / "a"), settings=settings())
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="--resume"):
        heal(dar_tiny, str(tmp_path / "b"), settings=settings())
    with pytest.raises(FileNotFoundError, match="no heal_state.pt"):
        heal(dar_tiny, str(tmp_path / "b"), settings=settings(), resume=True)
    with pytest.raises(DarConfigError, match="--max-tokens/--max-minutes"):
        HealSettings(context=CTX)
    with pytest.raises(DarConfigError, match="--weights: 'qx'"):
        settings(weights="qx")
    with pytest.raises(DarConfigError, match="--weight-lr"):
        settings(weights="q", weight_lr=0)
    with pytest.raises(DarConfigError, match="--precision: 'fp16'"):
        settings(precision="fp16")
    for tail in (-0.1, 1.5, float("nan")):
        with pytest.raises(DarConfigError, match="--average-tail"):
            settings(average_tail=tail)
    # A run of other --weights cannot be resumed under different ones.
    heal(dar_tiny, str(tmp_path / "c"), settings=settings(), calib_files=calib_text, progress=False,
         on_step=lambda m: True)
    with pytest.raises(DarConfigError, match="--weights"):
        heal(dar_tiny, str(tmp_path / "c"), settings=settings(weights="q"), calib_files=calib_text, progress=False,
             resume=True)
    assert cli(["heal", dar_tiny, str(tmp_path / "b"), "--max-tokens", "4096"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kl_weight,lm_weight", [(1.0, 0.0), (0.5, 0.25), (0.0, 1.0)])
def test_fused_loss_matches_plain_loss(kl_weight, lm_weight, precision):
    """The fused vocabulary projection and loss (blocks of rows, gradient taken in the forward pass) give the
    loss and the hidden-state gradient of the plain fp32 computation: F.kl_div(batchmean) + F.cross_entropy;
    under bf16 autocast (heal's ``precision="bf16"``) within bf16's rounding."""
    from vllm_dar.heal import _DistillHead

    gen = torch.Generator().manual_seed(0)
    n, e, vocab = 11, 8, 50
    s_hidden = torch.randn(n, e, generator=gen, requires_grad=True)
    t_hidden = torch.randn(n, e, generator=gen)
    weight = torch.randn(vocab, e, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[[4, 10]] = -1  # rows without a next token
    metrics = {}
    with HealSettings(max_tokens=CTX, context=CTX, precision=precision).autocast():
        got = _DistillHead.apply(s_hidden, t_hidden, weight, targets, kl_weight, lm_weight, 3, metrics)
    (g_got,) = torch.autograd.grad(got * 2.0, s_hidden)
    s_logp = torch.log_softmax(s_hidden @ weight.T, -1)
    kl = torch.nn.functional.kl_div(s_logp, torch.log_softmax(t_hidden @ weight.T, -1), log_target=True,
                                    reduction="batchmean")
    lm = torch.nn.functional.cross_entropy(s_hidden @ weight.T, targets, ignore_index=-1)
    want = kl_weight * kl + lm_weight * lm
    (g_want,) = torch.autograd.grad(want * 2.0, s_hidden)
    tol = 1e-5 if precision == "fp32" else 3e-2
    torch.testing.assert_close(got, want.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(g_got, g_want, atol=tol, rtol=tol)
    assert metrics["kl"] == pytest.approx(float(kl.detach()), abs=tol)
    assert metrics["lm"] == pytest.approx(float(lm.detach()), abs=tol)


def test_cli_defaults_are_the_settings_defaults():
    """`vllm-dar heal` without flags runs HealSettings' defaults (the CLI spells each default again), and
    heals at convert's default context, the one the conversion's bytes and calibration assume."""
    from vllm_dar.cli import build_parser

    a = build_parser().parse_args(["heal", "in", "out", "--max-minutes", "30"])
    for k, v in vars(HealSettings(max_minutes=30)).items():
        if hasattr(a, k):
            assert getattr(a, k) == v, k
    assert a.context == build_parser().parse_args(["convert", "in", "out"]).context
