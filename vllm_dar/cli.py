"""``vllm-dar`` command line: a thin argparse layer over keyword-only functions."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_prepare_model(a) -> dict:
    from .models import prepare_model

    out = prepare_model(a.name, a.out, dtype=a.dtype, force=a.force)
    return {"model": out, "dtype": a.dtype}


def _cmd_convert(a) -> dict:
    from .checkpoint import read_config
    from .config import ModelShape
    from .convert import convert
    from .convert.recipe import FIELDS

    budget = _budget_from_args(a, ModelShape.from_hf_config(read_config(a.src)).num_layers)  # refused before work
    text = _text_files(a)
    cfg = convert(a.src, a.out, **{f: getattr(a, f) for f in FIELDS}, calib_files=text, force=a.force,
                  progress=not a.quiet, device=a.device, budget=budget)
    return {"out": a.out, "dar": cfg.describe(), "kv_fraction": round(cfg.kv_fraction(a.context), 4),
            "kv_fraction_reserved": round(cfg.reserved_fraction(a.context), 4)}


def _add_domains_option(s, what: str) -> None:
    from .data import DOMAINS

    trained = [n for n, d in DOMAINS.items() if d.trained]
    s.add_argument("--train-domains", nargs="+", metavar="DOMAIN", choices=trained,
                   help=f"{what} text: the training parts of these Debian text domains, interleaved file by file "
                        f"({', '.join(trained)}; vllm_dar.data), instead of --calib")


def _text_files(a) -> list[str] | None:
    """``--calib``'s files, or those of ``--train-domains`` (not both); None: the default text."""
    from .data import mixed_train_files

    if a.calib and a.train_domains:
        raise ValueError("give --calib FILE... or --train-domains DOMAIN..., not both")
    return mixed_train_files(a.train_domains) if a.train_domains else a.calib


def _budget_from_args(a, num_layers: int):
    """The ``BudgetConfig`` of ``--token-budget`` and its companions, or None when it was not given."""
    from .config import BudgetConfig, parse_budget

    if a.token_budget is None:
        return None
    return BudgetConfig.make(parse_budget(a.token_budget), num_layers, schedule=a.budget_schedule,
                             beta=a.budget_beta, observation_window=a.observation_window, pooling=a.pooling,
                             pool_kernel=a.pool_kernel)


def _cmd_budget(a) -> dict:
    from .checkpoint import read_config, set_budget
    from .config import ModelShape

    if (a.token_budget is None) == (not a.clear):
        raise ValueError("give --token-budget F (set budgets) or --clear (remove them)")
    shape = ModelShape.from_hf_config(read_config(a.model))
    cfg = set_budget(a.model, None if a.clear else _budget_from_args(a, shape.num_layers))
    out = {"model": a.model, "dar": cfg.describe()}
    if cfg.budget is not None:
        out.update(per_layer=list(cfg.budget.per_layer),
                   kv_fraction_at_4096=round(cfg.kv_fraction(4096), 4))
    return out


def _add_budget_options(s) -> None:
    from dataclasses import fields

    from .config import POOLINGS, PYRAMID_BETA, BudgetConfig

    d = {f.name: f.default for f in fields(BudgetConfig)}
    s.add_argument("--token-budget", default=None, metavar="F",
                   help="distant prompt tokens each layer keeps (PyramidKV/SnapKV selection at the end of the prompt): "
                        "a fraction of a layer's candidates averaged over layers (0.1; 0: window and sinks only), or "
                        "an integer N: N tokens per layer on average")
    s.add_argument("--budget-schedule", default="pyramid", choices=["pyramid", "uniform"],
                   help="pyramid: more in lower layers, linear down to mean/beta in the top one; uniform: the same "
                        "in every layer (%(default)s)")
    s.add_argument("--budget-beta", type=float, default=PYRAMID_BETA,
                   help="pyramid: top layer keeps mean/beta (%(default)s)")
    s.add_argument("--observation-window", type=int, default=d["observation_window"],
                   help="the last W prompt queries score the candidates (%(default)s)")
    s.add_argument("--pooling", default=d["pooling"], choices=POOLINGS, help="score pooling (%(default)s)")
    s.add_argument("--pool-kernel", type=int, default=d["pool_kernel"], help="odd pooling width (%(default)s)")


def _cmd_compare(a) -> dict:
    from .compare import CompareSettings, compare

    settings = CompareSettings(**{k: getattr(a, k) for k in vars(CompareSettings())})
    return compare(a.stock_dir, a.dar_dir, settings=settings, log_dir=a.log_dir, progress=not a.quiet)


def _cmd_heal(a) -> dict:
    import torch

    from .heal import HealSettings, heal

    if a.threads:
        torch.set_num_threads(a.threads)
    settings = HealSettings(context=a.context, max_tokens=a.max_tokens, max_minutes=a.max_minutes, lr=a.lr,
                            kl_weight=a.kl_weight, lm_weight=a.lm_weight, seed=a.seed, save_every=a.save_every,
                            weights=a.weights, weight_lr=a.weight_lr, precision=a.precision,
                            average_tail=a.average_tail)
    return heal(a.dar_dir, a.out, settings=settings, resume=a.resume, force=a.force,
                calib_files=_text_files(a), progress=not a.quiet, device=a.device)


def _device(name: str) -> str:
    """``--device``: cpu or cuda[:N], and only a CUDA device torch can see."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device ({e})") from e
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: expected cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: torch sees no CUDA device on this machine")
    return name


def _text_windows(tokenizer, a):
    from .data import token_windows

    return token_windows(tokenizer, a.text, context=a.context, max_windows=a.max_windows)


def _cmd_eval(a) -> dict:
    if a.engine == "vllm":
        from .vllm_engine import vllm_perplexity

        return vllm_perplexity(a.model, a.text, context=a.context, max_windows=a.max_windows, dtype=a.dtype)
    from .evaluate import kv_report, load_for_eval, perplexity

    model, tokenizer, cfg, proj = load_for_eval(a.model, a.dtype)
    result = perplexity(model, _text_windows(tokenizer, a), cfg=cfg, projections=proj, progress=not a.quiet,
                        prefix=a.prefix)
    del result["argmax"]
    result.pop("position_nll", None)  # per-position tensor: the CLI prints JSON
    result.update(kv_report(cfg, model.config, a.context, model.dtype))
    result.update(model=a.model, engine="hf", context=a.context, dtype=str(model.dtype).removeprefix("torch."))
    if a.prefix is not None:
        result["prefix"] = a.prefix
    return result


def _cmd_generate(a) -> dict:
    with open(a.prompt_file) as f:
        prompt = f.read()
    if a.engine == "vllm":
        from .vllm_engine import vllm_generate

        return vllm_generate(a.model, prompt, max_tokens=a.max_tokens, dtype=a.dtype)
    from .evaluate import greedy, load_for_eval

    model, tokenizer, cfg, proj = load_for_eval(a.model, a.dtype)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = greedy(model, ids, a.max_tokens, cfg=cfg, projections=proj, eos_token_id=tokenizer.eos_token_id)
    return {"prompt_tokens": len(ids), "token_ids": out, "text": tokenizer.decode(out), "engine": "hf"}


def _add_convert(sub) -> None:
    from .convert.recipe import DEFAULT as R
    from .convert.recipe import DEFAULT_KV_BUDGET

    s = sub.add_parser("convert", help="write a DAR-converted checkpoint (defaults: the recommended recipe)",
                       description="Convert a Hugging Face checkpoint to DAR. With no options: joint projections, "
                       f"{R.sink_tokens} sink tokens, per-layer windows and ranks calibrated to {DEFAULT_KV_BUDGET} "
                       "of the stock KV bytes at --context (as vLLM reserves them); --kv-budget sets the bytes.")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--kv-budget", type=float, default=R.kv_budget, metavar="F",
                   help="KV bytes as a fraction of the stock cache's at --context, in (0, 1], spent by the "
                        "calibrated schedule, counted as vLLM's caches reserve them (16-token window blocks, two "
                        f"tails; far caches in whole pages); default: {DEFAULT_KV_BUDGET}, or the bytes of a "
                        "--window/--key-rank/--value-rank setting given)")
    s.add_argument("--window", type=int, default=R.window,
                   help="full-width recent positions, current one included (%(default)s)")
    s.add_argument("--key-rank", type=int, default=R.key_rank, help="(%(default)s)")
    s.add_argument("--value-rank", type=int, default=R.value_rank, help="(%(default)s)")
    s.add_argument("--sink-tokens", type=int, default=R.sink_tokens,
                   help="first N positions kept at full width (%(default)s)")
    s.add_argument("--schedule", default=R.schedule, choices=["uniform", "pyramid", "calibrated"],
                   help="uniform: --window/--key-rank/--value-rank in every layer; pyramid: ranks ramp down the "
                        "layers; calibrated: per-layer windows and ranks chosen on measured errors (%(default)s)")
    s.add_argument("--method", default=R.method, choices=["pca", "qk", "fit"],
                   help="pca: PCA of keys/values; qk: query-aware keys, o_proj-aware values; "
                        "fit: PCA then layer-wise fitting to each layer's attention output (%(default)s)")
    s.add_argument("--fit-steps", type=int, default=R.fit_steps, help="fit method: optimiser steps per layer")
    s.add_argument("--head-sharing", default=R.head_sharing, choices=["per_head", "joint"],
                   help="joint: one projection across a layer's KV heads (LRKV-style; ranks count for the "
                        "whole layer) (%(default)s)")
    s.add_argument("--qk-reg", type=float, default=R.qk_reg, help="qk method: covariance ridge (larger -> PCA)")
    s.add_argument("--calib", nargs="+", metavar="FILE", help="calibration text files "
                   "(default: the calibration part of python3.11-doc's sources)")
    _add_domains_option(s, "calibration")
    s.add_argument("--calib-tokens", type=int, default=R.calib_tokens)
    s.add_argument("--context", type=int, default=R.context, help="calibration window and budget context")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.add_argument("--device", type=_device, default="cpu",
                   help="where the calibration forward passes run, in fp32 (cpu, cuda); fitting runs on the CPU")
    _add_budget_options(s)
    s.set_defaults(fn=_cmd_convert)


def _add_compare(sub) -> None:
    from .compare import CompareSettings, render

    d = CompareSettings()
    s = sub.add_parser("compare", help="serve a stock model and its DAR conversion side by side with vLLM",
                       description="Serve STOCK_DIR and DAR_DIR with vllm.LLM, each in its own process with the "
                       "same KV cache space and dtype, and print vLLM's KV capacity, the answer to one prompt, "
                       "perplexity on held-out text and decode speed of both.")
    s.add_argument("stock_dir")
    s.add_argument("dar_dir")
    s.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32", "float16"],
                   help="served dtype of both engines (%(default)s)")
    s.add_argument("--kv-cache-gib", type=int, default=d.kv_cache_gib,
                   help="VLLM_CPU_KVCACHE_SPACE of both engines (%(default)s)")
    s.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="of both engines (default: vLLM's, the model's maximum context)")
    s.add_argument("--context", type=int, default=d.context, help="perplexity window (%(default)s)")
    s.add_argument("--eval-windows", type=int, default=d.eval_windows, help="perplexity windows (%(default)s)")
    s.add_argument("--batch", type=int, default=d.batch, help="decode speed: prompts (%(default)s)")
    s.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens,
                   help="decode speed: tokens per prompt (%(default)s)")
    s.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                   help="decode speed: greedy tokens per prompt (%(default)s)")
    s.add_argument("--answer-tokens", type=int, default=d.answer_tokens,
                   help="greedy tokens of the answer (%(default)s)")
    s.add_argument("--compile", action="store_true", default=d.compile,
                   help="serve with vLLM's torch.compile (its default; minutes more per engine start) instead of "
                        "eagerly")
    s.add_argument("--log-dir", default=None, help="where the engines' logs go (default: a temporary directory)")
    s.set_defaults(fn=_cmd_compare, render=render)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-dar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare-model", help="build an embedded default model as a safetensors checkpoint")
    s.add_argument("name", help="embedded model name, e.g. smollm2-135m")
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=_cmd_prepare_model)

    _add_convert(sub)
    _add_compare(sub)

    s = sub.add_parser("budget", help="set or remove the per-layer token budgets of a DAR-converted checkpoint in "
                       "place (no reconversion)")
    s.add_argument("model", help="a DAR-converted checkpoint")
    _add_budget_options(s)
    s.add_argument("--clear", action="store_true", help="remove the budgets (every distant token kept)")
    s.set_defaults(fn=_cmd_budget)

    s = sub.add_parser("heal", help="distil the full model into a DAR-converted one (trains the projections, "
                       "optionally attention weights)")
    s.add_argument("dar_dir", help="a DAR-converted checkpoint (vllm-dar convert)")
    s.add_argument("out")
    s.add_argument("--max-tokens", type=int, default=None, help="training token budget")
    s.add_argument("--max-minutes", type=float, default=None, help="wall-time budget of the training loop")
    s.add_argument("--context", type=int, default=2048,
                   help="tokens per training sequence; heal at the context you serve: distances beyond it are never "
                        "trained (default: 2048, convert's --context)")
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(full model || DAR model)")
    s.add_argument("--lm-weight", type=float, default=0.0, help="weight of the DAR model's LM loss")
    s.add_argument("--weights", default="", metavar="LETTERS",
                   help="also train these attention weights of every layer: letters of 'qkvo' (q_proj, k_proj, "
                        "v_proj, o_proj); the output then carries the trained weights (default: projections only)")
    s.add_argument("--weight-lr", type=float, default=2e-4, help="learning rate of the --weights")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="matmul precision of training steps (bf16 autocast keeps fp32 parameters and losses; "
                        "auto: bf16 where the device has native bf16 dot products: CPUs with AVX512-BF16 or AMX, "
                        "CUDA compute capability 8.0+)")
    s.add_argument("--device", type=_device, default="cpu", help="where the model trains (cpu, cuda)")
    s.add_argument("--average-tail", type=float, default=0.0, metavar="FRACTION",
                   help="write the mean of the trained parameters over this last fraction of the budget (default "
                        "0: the last step's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--save-every", type=int, default=10, help="steps between OUT/heal_state.pt saves")
    s.add_argument("--calib", nargs="+", metavar="FILE", help="training text (default: the calibration part "
                   "of python3.11-doc's sources)")
    _add_domains_option(s, "training")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--resume", action="store_true", help="continue the run saved in OUT")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=_cmd_heal)

    for name, fn, help_ in (("eval", _cmd_eval, "perplexity of a stock or DAR-converted model"),
                            ("generate", _cmd_generate, "greedy continuation")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("model")
        s.add_argument("--engine", default="hf", choices=["hf", "vllm"])
        s.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                       help="default: the checkpoint's")
        s.set_defaults(fn=fn)
        if name == "eval":
            s.add_argument("--text", nargs="+", required=True, metavar="FILE")
            s.add_argument("--context", type=int, default=2048)
            s.add_argument("--max-windows", type=int, default=None)
            s.add_argument("--prefix", type=int, default=None, metavar="P",
                           help="score only each window's continuation after a P-token prompt (hf engine; needed "
                                "for token budgets, which evict at the prompt's end)")
        else:
            s.add_argument("--prompt-file", required=True)
            s.add_argument("--max-tokens", type=int, default=32)
    for s in sub.choices.values():
        s.add_argument("--json", action="store_true", help="print one JSON object")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"vllm-dar {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif getattr(args, "render", None):
        print(args.render(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
