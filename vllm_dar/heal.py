"""Healing fine-tune: distil the full model into its DAR-converted self, training the DAR projections only.

Teacher: the same model with standard attention. Student: the model with DAR attention (``vllm_dar.hf``'s
attention interface) whose projections are ``nn.Parameter``s, so gradients reach them through the reference
attention while every model weight stays frozen. Loss: ``kl_weight * KL(teacher || student)`` on the next-token
distributions, plus ``lm_weight *`` the student's LM loss (default 0: the student aims at the full model, not at
the training text, so "vs full" keeps measuring what DAR loses rather than domain adaptation).

Why projections only by default: they are all a converted checkpoint adds, so the healed checkpoint keeps the
source weights byte for byte, serves with nothing new, and still equals the stock model inside the window; they
are small (``2 * Dg * (r_k + r_v)`` numbers per projection group and layer, ``Dg`` its input width), so a few
tens of thousands of tokens fit them without over-fitting the training text. Their capacity is limited, though: the KL of
a projections-only heal stops falling early.

``weights`` (e.g. ``"qk"``, ``"qkvo"``) also trains those attention weights of every layer (Thin Keys' QK
fine-tune: the model learns queries and keys that survive the reduction), at their own learning rate
``weight_lr``. The teacher is then a frozen copy of the source model, the loss covers every position (the
weights change in-window attention too), and the output checkpoint carries the trained weights (the source's
other tensors byte for byte). The README's quality table gives what each setting reached, with its command.

``context``: the tokens of one training sequence, so the longest query-key distance a step trains. Heal at the
context you serve: a heal at a shorter context takes more steps in the same time but never trains the query-key
distances beyond it, which a longer served context uses. The default is convert's ``--context``.

Speed (``benchmarks/heal_speed.py`` times these): a step's forward pass runs under bf16 autocast where the CPU has
native bf16 dot products (``precision``: matmuls and attention in bf16; parameters, Adam state, norms and the loss
stay fp32), DAR attention runs in query blocks that read only the keys they see (``dar_attention_sdpa``), and
``lm_head`` runs fused with the loss over blocks of rows (``_DistillHead``: no [tokens, vocab] tensor lives
longer than a block).

Text: the calibration split of ``vllm_dar.data`` only (held-out files are never seen). Bounded by tokens and/or
wall time; the learning rate warms up, then follows a cosine to 10% over the budget. ``average_tail``: the output
is the mean of the trained parameters after each step in the last fraction of the budget (Polyak/SWA-style tail
averaging), not the last step's: with one window per step, the last step's parameters lean toward the last few
windows seen, and which windows those are depends on the seed. Off by default (the README says what it measured).
The run state (projections, Adam moments, step, tokens, seconds, data cursor) is saved to ``OUT/heal_state.pt``
every ``save_every`` steps and on Ctrl-C; ``resume`` continues from it. The result is an ordinary DAR-converted
checkpoint (``fill_converted``), with the final state moved to ``OUT/dar/heal_state.pt`` (vLLM never reads that
folder). Killed at any point, a run leaves no OUT (before its first save), OUT holding only a run state (no
``config.json``: never loads as a checkpoint), or the complete output with its final state (``vllm_dar._fs``
publishes it in one swap); ``resume`` then ends where an uninterrupted run would (``tests/test_kill.py``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._fs import atomic_dir, atomic_file, discard, kill_point
from .checkpoint import fill_converted, load_dar
from .config import DarConfig, DarConfigError
from .hf import dar_attention_enabled
from .reference import LayerProjections

STATE_FILE = "heal_state.pt"
FINAL_STATE = os.path.join("dar", STATE_FILE)
_FIELDS = ("q_proj", "k_down", "v_down", "v_up")
_RUN_FIELDS = ("context", "lr", "warmup_steps", "kl_weight", "lm_weight", "seed", "data_tokens", "weights",
               "weight_lr", "average_tail")  # fixed by resume
WEIGHT_LETTERS = "qkvo"  # self_attn.{q,k,v,o}_proj
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class HealSettings:
    """Hyper-parameters and bounds of one healing run (errors name the CLI flag)."""

    context: int = 2048            # tokens per training sequence: the longest distance a step trains
    max_tokens: int | None = None  # stop before exceeding this many training tokens
    max_minutes: float | None = None  # stop when the next step would pass this wall time
    lr: float = 3e-3
    warmup_steps: int = 5
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    seed: int = 0
    save_every: int = 10           # steps between state saves
    data_tokens: int = 1 << 20     # calibration-split tokens to cycle through (shuffled windows)
    weights: str = ""              # attention weights trained too: letters of "qkvo" ("" = projections only)
    weight_lr: float = 2e-4
    precision: str = "auto"        # training steps: "fp32", "bf16" (autocast), "auto" (bf16 where the device has
                                   #   native bf16 dot products, else fp32)
    average_tail: float = 0.0      # the output is the mean of the trained parameters after each step of this last
                                   #   fraction of the budget (0: the last step's)

    def __post_init__(self):
        if self.max_tokens is None and self.max_minutes is None:
            raise DarConfigError("--max-tokens/--max-minutes: give at least one bound")
        if self.max_tokens is not None and self.max_tokens < self.context:
            raise DarConfigError(f"--max-tokens: {self.max_tokens} is less than one --context ({self.context})")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise DarConfigError(f"--max-minutes: {self.max_minutes} must be > 0")
        for name in ("context", "save_every", "data_tokens"):
            if getattr(self, name) < 1:
                raise DarConfigError(f"--{name.replace('_', '-')}: {getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise DarConfigError(f"--lr: {self.lr} must be > 0")
        if not self.weight_lr > 0:
            raise DarConfigError(f"--weight-lr: {self.weight_lr} must be > 0")
        if set(self.weights) - set(WEIGHT_LETTERS) or len(set(self.weights)) != len(self.weights):
            raise DarConfigError(f"--weights: {self.weights!r} must be distinct letters of {WEIGHT_LETTERS!r} "
                                 "(q_proj, k_proj, v_proj, o_proj)")
        if not 0 <= self.average_tail <= 1:
            raise DarConfigError(f"--average-tail: {self.average_tail} must be in [0, 1]")
        if self.precision not in PRECISIONS:
            raise DarConfigError(f"--precision: {self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.kl_weight < 0 or self.lm_weight < 0 or self.kl_weight + self.lm_weight == 0:
            raise DarConfigError(f"--kl-weight/--lm-weight: {self.kl_weight}/{self.lm_weight} must be >= 0, "
                                 "not both 0")

    def progress(self, tokens: int, seconds: float) -> float:
        """Fraction of the budget used: the larger of the token and the time fraction."""
        fr = [tokens / self.max_tokens] if self.max_tokens else []
        fr += [seconds / (60 * self.max_minutes)] if self.max_minutes else []
        return min(1.0, max(fr))

    def bf16_steps(self, device_type: str = "cpu") -> bool:
        """Whether training steps on ``device_type`` ("cpu", "cuda") run under bf16 autocast (``precision``, with
        "auto" resolved on this machine's device of that type)."""
        return self.precision == "bf16" or (self.precision == "auto" and _native_bf16(device_type))

    def autocast(self, device_type: str = "cpu"):
        """The context a training step's forward pass on ``device_type`` runs in. Under bf16 autocast the matmuls
        and attention run in bf16 while parameters, Adam state, norms, the loss's softmaxes and the loss stay fp32
        (``benchmarks/heal_speed.py`` times the settings and measures the full model's fp32-vs-bf16 KL; the healed
        model is measured in fp32 by ``benchmarks/quality.py``)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16_steps(device_type))

    def lr_at(self, step: int, tokens: int, seconds: float) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps)
        return self.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * self.progress(tokens, seconds))))


class TrainableProjections(nn.Module):
    """Every layer's projections as parameters; ``layers()`` gives ``LayerProjections`` views on them, which the
    attention interface uses as is (so Adam's in-place updates reach the next forward)."""

    def __init__(self, projections: list[LayerProjections]):
        super().__init__()
        for f in _FIELDS:
            setattr(self, f, nn.ParameterList([nn.Parameter(getattr(p, f).detach().float().clone())
                                               for p in projections]))

    def layers(self) -> list[LayerProjections]:
        return [LayerProjections(*(getattr(self, f)[i] for f in _FIELDS)) for i in range(len(self.q_proj))]

    def frozen(self) -> list[LayerProjections]:
        """Copies of the current projections, on the CPU."""
        return [LayerProjections(*(t.detach().to("cpu", copy=True) for t in (p.q_proj, p.k_down, p.v_down, p.v_up)))
                for p in self.layers()]


def _native_bf16(device_type: str = "cpu") -> bool:
    """Whether this machine's ``device_type`` device has native bf16 dot products: CUDA from compute capability
    8.0 (tensor cores); CPUs with AVX512-BF16 or AMX (elsewhere oneDNN emulates bf16, which loses precision without
    gaining speed; private torch probes, so a torch without them means fp32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def first_affected(cfg: DarConfig) -> int:
    """First position whose attention has a reduced-width pair in some layer (earlier logits equal the full
    model's, so the loss skips them)."""
    return min(cfg.window) + cfg.sink_tokens


class _DistillHead(torch.autograd.Function):
    """``lm_head`` plus the distillation loss, fused over blocks of rows: the [rows, vocab] logits of the student
    and teacher exist one block at a time, and the gradient with respect to the student's hidden states is
    computed during the forward pass (``lm_head`` is frozen, so nothing else needs the logits later).

    Per row: ``KL(p_t || p_s)`` has gradient ``p_s - p_t`` in the student's logits; the LM loss has
    ``p_s - onehot(target)``. The loss is ``kl_weight * mean KL + lm_weight * mean LM`` (rows whose target is
    negative have no LM term), as ``F.kl_div(..., reduction="batchmean")`` and ``F.cross_entropy`` give it."""

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, weight, targets, kl_weight, lm_weight, rows, out):
        n = s_hidden.shape[0]
        n_lm = max(1, int((targets >= 0).sum()))
        grad = torch.zeros_like(s_hidden)
        device_type = s_hidden.device.type
        if torch.is_autocast_enabled(device_type):  # cast the [V, hidden] weight once, not once per block and product
            weight = weight.to(torch.get_autocast_dtype(device_type))
        kl_sum = lm_sum = 0.0
        for a in range(0, n, rows):
            b = min(n, a + rows)
            s_logp = F.log_softmax(F.linear(s_hidden[a:b], weight).float(), -1)  # [rows, V]
            t_logp = F.log_softmax(F.linear(t_hidden[a:b], weight).float(), -1)
            p_t = t_logp.exp()
            p_s = s_logp.exp()
            kl_sum += float((p_t * (t_logp - s_logp)).sum())
            tg = targets[a:b]
            has = (tg >= 0).nonzero().squeeze(1)
            lm_sum -= float(s_logp[has, tg[has]].sum())
            g = p_s.sub_(p_t).mul_(kl_weight / n)  # d(kl_weight * KL) / d(student logits)
            if lm_weight:
                g[has] += s_logp[has].exp().mul_(lm_weight / n_lm)
                g[has, tg[has]] -= lm_weight / n_lm
            grad[a:b] = F.linear(g.to(weight.dtype), weight.t()).to(grad.dtype)
        ctx.save_for_backward(grad)
        out["kl"], out["lm"] = kl_sum / n, lm_sum / n_lm
        return s_hidden.new_tensor(kl_weight * out["kl"] + lm_weight * out["lm"], dtype=torch.float32)

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        return go * grad, None, None, None, None, None, None, None


def distill_loss(model, ids: Tensor, cfg: DarConfig, layers: list[LayerProjections], *, kl_weight: float = 1.0,
                 lm_weight: float = 0.0, teacher=None, rows: int = 128) -> tuple[Tensor, dict]:
    """Loss on one batch of token ids [B, T]: KL(teacher || student) per position (+ LM loss), averaged over
    the positions DAR affects, or over every position when a separate ``teacher`` is given (the student's
    weights are trained then, so no position is exact). Returns (loss, {"kl": ..., "lm": ...}). The vocabulary
    projection and the loss run fused, ``rows`` positions at a time (``_DistillHead``)."""
    start = 0 if teacher is not None else min(first_affected(cfg), ids.shape[1] - 2)
    teacher = model if teacher is None else teacher
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state[:, start:]  # [B, N, hidden]
    # Token budgets (an inference-time eviction, kept in the healed checkpoint's config) are not trained under.
    with dar_attention_enabled(model, dataclasses.replace(cfg, budget=None), layers):
        s_hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, start:]
    head = model.lm_head
    if head.bias is not None:
        raise DarConfigError("heal: the fused loss needs a bias-free lm_head (Llama-family heads have none)")
    targets = F.pad(ids[:, start + 1:], (0, 1), value=-1).flatten()  # [B*N]: the next token; none for the last
    metrics = {}
    # lm_head is never trained (heal freezes every weight but --weights' attention ones): no gradient reaches it
    loss = _DistillHead.apply(s_hidden.flatten(0, 1), t_hidden.flatten(0, 1), head.weight.detach(), targets, kl_weight,
                              lm_weight, rows, metrics)
    return loss, metrics


def attention_weights(model, letters: str) -> dict[str, nn.Parameter]:
    """The model's ``self_attn.{x}_proj.weight`` parameters for each letter x, by checkpoint name."""
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == "self_attn" and parts[-1] == "weight" and \
                parts[-2] in {f"{x}_proj" for x in letters}:
            out[name] = p
    if letters and not out:
        raise DarConfigError(f"--weights {letters!r}: the model has no self_attn.*_proj weights to train")
    return out


def new_state(params: TrainableProjections, opt: torch.optim.Optimizer, settings: HealSettings, source: dict):
    return {"format": 1, "step": 0, "tokens": 0, "seconds": 0.0, "history": [], "source": source,
            "run": {k: getattr(settings, k) for k in _RUN_FIELDS}, "params": params.state_dict(),
            "optim": opt.state_dict(), "weights": {}}


def trainables(model, projections: list[LayerProjections], settings: HealSettings):
    """What a run trains, set up on ``model``: every model weight frozen except the attention weights named by
    ``settings.weights``. Returns (teacher, weights, params, opt): the teacher is a frozen copy of the source model
    when weights are trained (else None: the student with DAR attention off); weights by checkpoint name; the
    projections as parameters; Adam over both, one group each, with the ``base_lr`` the schedule scales."""
    for p in model.parameters():
        p.requires_grad_(False)
    teacher = copy.deepcopy(model).eval() if settings.weights else None
    weights = attention_weights(model, settings.weights)
    params = TrainableProjections(projections).to(next(model.parameters()).device)
    groups = [{"params": list(params.parameters()), "lr": settings.lr, "base_lr": settings.lr}]
    if weights:
        for p in weights.values():
            p.requires_grad_(True)
        groups.append({"params": list(weights.values()), "lr": settings.weight_lr, "base_lr": settings.weight_lr})
    return teacher, weights, params, torch.optim.Adam(groups)


def train_step(model, cfg: DarConfig, ids: Tensor, params: TrainableProjections, opt: torch.optim.Optimizer,
               settings: HealSettings, teacher=None) -> dict:
    """One optimiser step on token ids [B, T] (on the model's device): the forward pass under
    ``settings.autocast()`` (only the forward, as torch advises), backward and the Adam step outside it. Returns
    the loss's metrics."""
    with torch.enable_grad():
        with settings.autocast(ids.device.type):
            loss, m = distill_loss(model, ids, cfg, params.layers(), kl_weight=settings.kl_weight,
                                   lm_weight=settings.lm_weight, teacher=teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return m


def heal_projections(model, cfg: DarConfig, projections: list[LayerProjections], windows: list[list[int]],
                     settings: HealSettings, *, state: dict | None = None, save: Callable[[dict], None] | None = None,
                     progress: bool = True, on_step: Callable[[dict], bool | None] | None = None):
    """The training loop on in-memory objects. ``windows``: token id lists of ``settings.context`` tokens,
    visited in a seeded shuffled order (cycled). ``state``: a saved state to continue from. ``save(state)`` is
    called every ``save_every`` steps, at the end and on Ctrl-C; ``on_step(metrics)`` returning True stops early.
    With ``settings.weights`` the model's attention weights named there are trained in place (the teacher is a
    frozen copy taken first). Returns (projections, state, finished); when finished, the returned projections and
    the model's weights are the output (the tail's mean under ``average_tail``), while ``state["params"]`` and
    ``state["weights"]`` keep the last step's, which a resumed run continues from."""
    from tqdm import tqdm

    teacher, weights, params, opt = trainables(model, projections, settings)
    device = next(model.parameters()).device
    if state is None:
        state = new_state(params, opt, settings, source={})
    params.load_state_dict(state["params"])
    with torch.no_grad():  # a resumed run's trained weights (its --weights equal ours: _check_resume)
        for name, saved in state.get("weights", {}).items():
            weights[name].copy_(saved)
    opt.load_state_dict(state["optim"])
    budget = [settings.max_tokens, settings.max_minutes]
    if state.get("average") and state["average"].get("budget") != budget:
        del state["average"]  # resumed under another budget: its tail starts elsewhere
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(settings.seed))
    bar = tqdm(total=settings.max_tokens, initial=state["tokens"], unit="tok", unit_scale=True, desc="healing",
               disable=not progress, dynamic_ncols=True)
    finished, last_step = False, state.get("last_step", 0.0)  # a finished time-bound run resumed stays finished

    def snapshot():
        state.update(params={k: v.detach().clone() for k, v in params.state_dict().items()}, optim=opt.state_dict(),
                     weights={k: v.detach().clone() for k, v in weights.items()})
        if save is not None:
            save(state)
    try:
        while True:
            if settings.max_tokens is not None and state["tokens"] + settings.context > settings.max_tokens:
                finished = True
            if settings.max_minutes is not None and state["seconds"] + last_step > 60 * settings.max_minutes:
                finished = True
            if finished:
                break
            t0 = time.time()
            lr = settings.lr_at(state["step"], state["tokens"], state["seconds"])
            for g in opt.param_groups:
                g["lr"] = lr * g.get("base_lr", settings.lr) / settings.lr  # runs saved before weights: one group
            ids = torch.tensor([windows[int(order[state["step"] % len(windows)])]], device=device)  # [1, T]
            m = train_step(model, cfg, ids, params, opt, settings, teacher)
            last_step = time.time() - t0
            state["step"] += 1
            state["tokens"] += ids.numel()
            state["seconds"] += last_step
            state["last_step"] = last_step
            if settings.average_tail and settings.progress(state["tokens"], state["seconds"]) >= \
                    1 - settings.average_tail:
                _accumulate(state, params, weights, budget)
            m.update(step=state["step"], tokens=state["tokens"], seconds=round(state["seconds"], 1), lr=lr)
            state["history"].append({k: round(v, 5) if isinstance(v, float) else v for k, v in m.items()})
            bar.update(ids.numel())
            bar.set_postfix(kl=f"{m['kl']:.4f}", lr=f"{lr:.1e}", min=f"{state['seconds'] / 60:.1f}")
            if state["step"] % settings.save_every == 0:
                snapshot()
            if on_step is not None and on_step(m):
                break
    except KeyboardInterrupt:
        snapshot()
        raise
    finally:
        bar.close()
        for p in weights.values():
            p.requires_grad_(False)
    state["done"] = finished
    snapshot()  # the last step's parameters, with its Adam moments: what a resumed run continues from
    if finished and state.get("average"):  # the output: the tail's mean, in place (the model's weights too)
        with torch.no_grad():
            params.load_state_dict(state["average"]["params"])
            for k, v in state["average"]["weights"].items():
                weights[k].copy_(v)
    elif finished and settings.average_tail:
        warnings.warn(f"--average-tail {settings.average_tail}: no step ended in the tail (each step is a larger "
                      "share of the budget); the output is the last step's", stacklevel=2)
    return params.frozen(), state, finished


def averaged_steps(state: dict) -> int:
    """How many steps' parameters the run state's tail average holds (0: none, the output is the last step's)."""
    return state.get("average", {}).get("n", 0)


def _accumulate(state: dict, params: TrainableProjections, weights: dict[str, nn.Parameter], budget: list) -> None:
    """Add the current trained parameters to the running mean ``state["average"]`` (saved with the run state, so a
    resumed run keeps averaging where it stopped; ``budget`` tells a resume under another budget to start over)."""
    now = {"params": params.state_dict(), "weights": {k: v.detach() for k, v in weights.items()}}
    avg = state.get("average")
    if not avg:
        state["average"] = {"n": 1, "budget": budget,
                            **{g: {k: v.detach().clone() for k, v in t.items()} for g, t in now.items()}}
        return
    avg["n"] += 1
    with torch.no_grad():
        for g, t in now.items():
            for k, v in t.items():
                avg[g][k].lerp_(v, 1 / avg["n"])


def _state_path(out: str) -> str | None:
    for rel in (STATE_FILE, FINAL_STATE):
        if os.path.isfile(os.path.join(out, rel)):
            return os.path.join(out, rel)
    return None


def _save_state(path: str, state: dict) -> None:
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):  # a run's first save creates OUT, with the state in it from the start
        with atomic_dir(folder, prefix=".heal-state-") as new:
            torch.save(state, os.path.join(new, os.path.basename(path)))
        return
    with atomic_file(path, tmp=path + ".tmp") as tmp:  # a crash mid-save keeps the previous state
        torch.save(state, tmp)
        kill_point("heal:state-written")


def load_state(path: str) -> dict:
    """A saved run state, read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples
    and dicts only, so a crafted file cannot run code. Anything else is refused naming the file."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DarConfigError(f"--resume: {path} is not a heal run state readable without running code "
                             f"(torch.load weights_only=True: {why})") from e
    if not isinstance(state, dict) or state.get("format") != 1 or not {"run", "source", "params"} <= state.keys():
        raise DarConfigError(f"--resume: {path} is not a heal run state (format 1 with run, source and params)")
    return state


def _check_resume(state: dict, settings: HealSettings, source: dict, out: str) -> None:
    defaults = {k: f.default for k, f in HealSettings.__dataclass_fields__.items()}
    for k in _RUN_FIELDS:
        was = state["run"].get(k, defaults[k])  # fields added later took their defaults in older runs
        if k == "weight_lr" and not settings.weights and not state["run"].get("weights"):
            continue  # projections-only runs never use it (and older runs recorded another default)
        if was != getattr(settings, k):
            raise DarConfigError(f"--{k.replace('_', '-')}: {getattr(settings, k)!r} differs from the run being "
                                 f"resumed in {out} ({was!r})")
    if state["source"]["dar"] != source["dar"]:
        raise DarConfigError(f"--resume: {out} was healing a different DAR checkpoint "
                             f"({state['source']['dar_dir']})")


def heal(dar_dir: str, out: str, *, settings: HealSettings, resume: bool = False, force: bool = False,
         calib_files: list[str] | None = None, progress: bool = True,
         on_step: Callable[[dict], bool | None] | None = None, device: str = "cpu") -> dict:
    """Heal the DAR-converted checkpoint ``dar_dir`` into ``out`` (an ordinary DAR-converted checkpoint).

    Returns a summary; ``finished`` is False when ``on_step`` stopped the run early (then ``out`` holds only the
    run state, and ``resume=True`` continues it). ``device``: where the model and the training run (a run saved on
    one device resumes on any)."""
    from .data import split_files, token_windows
    from .hf import load_model

    cfg, projections = load_dar(dar_dir)
    if cfg is None:
        raise DarConfigError(f"{dar_dir}: config.json has no dar section; convert it first (vllm-dar convert)")
    if os.path.abspath(out) == os.path.abspath(dar_dir):
        raise ValueError("OUT must differ from DAR_DIR: the source checkpoint is never modified")
    source = {"dar_dir": os.path.abspath(dar_dir), "dar": cfg.to_json()}
    state = None
    if resume:
        path = _state_path(out)
        if path is None:
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out}")
        state = load_state(path)
        _check_resume(state, settings, source, out)
    elif os.path.exists(out):
        if not force:
            raise FileExistsError(f"{out} exists; pass --resume to continue its healing run or --force to replace it")
        discard(out, prefix=".heal-")  # OUT appears again at the first state save
    model, tokenizer = load_model(dar_dir, dtype="float32")
    model.to(device)
    files = calib_files or split_files()[0]  # the calibration split only: held-out text is never trained on
    windows = token_windows(tokenizer, files, context=settings.context, max_tokens=settings.data_tokens)
    live = os.path.join(out, STATE_FILE)

    def save(s: dict) -> None:
        _save_state(live, {**s, "source": source})
        kill_point("heal:saved")
    t0 = time.time()
    healed, state, finished = heal_projections(model, cfg, projections, windows, settings, state=state,
                                               progress=progress, on_step=on_step, save=save)
    summary = {"out": out, "finished": finished, "steps": state["step"], "tokens": state["tokens"],
               "minutes": round(state["seconds"] / 60, 2), "averaged_steps": averaged_steps(state),
               "wall_minutes_this_run": round((time.time() - t0) / 60, 2),
               "kl_first": state["history"][0]["kl"] if state["history"] else None,
               "kl_last": state["history"][-1]["kl"] if state["history"] else None}
    if not finished:
        return summary
    record = {k: v for k, v in summary.items() if k not in ("out", "finished", "wall_minutes_this_run")}
    record.update(settings={k: v for k, v in asdict(settings).items()},
                  bf16_steps=settings.bf16_steps(torch.device(device).type), device=str(device),
                  source=source["dar_dir"], train_windows=len(windows))
    healed_cfg = DarConfig(**{**cfg.__dict__, "method": f"{cfg.method}+heal",
                              "extra": {**cfg.extra, "heal": record}})
    # replaces out (and its live state) atomically, final state included; trained attention weights replace the
    # source's
    trained = {k: p.detach().cpu() for k, p in attention_weights(model, settings.weights).items()}  # the output's
    with atomic_dir(out, force=True, prefix=".heal-") as new:
        fill_converted(dar_dir, new, healed_cfg, healed, weights=trained or None)
        _save_state(os.path.join(new, FINAL_STATE), {**state, "source": source})
    return summary
