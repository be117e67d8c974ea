"""Read and write DAR-converted checkpoints: the source checkpoint's files, a ``dar`` section in ``config.json``,
and the projections in ``dar/projections.safetensors`` (a subfolder that vLLM's weight loader never globs).

Writes are atomic: everything goes to a temporary sibling folder renamed into place at the end, so a failed
conversion leaves nothing half-written at OUT.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ._fs import atomic_dir, atomic_file
from .config import BudgetConfig, DarConfig, DarConfigError, ModelShape, read_json
from .reference import LayerProjections

_FIELDS = ("q_proj", "k_down", "v_down", "v_up")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # read as fp32


def expected_shapes(cfg: DarConfig, layer: int) -> dict[str, tuple[int, ...]]:
    s, lay = cfg.shape, cfg.layer(layer)
    j, d, g, dg = s.num_kv_heads, s.head_dim, lay.groups, lay.group_dim
    return {"q_proj": (j, d, lay.key_rank), "k_down": (g, dg, lay.key_rank),
            "v_down": (g, dg, lay.value_rank), "v_up": (j, lay.value_rank, d)}


def save_projections(path: str, projections: list[LayerProjections]) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, p in enumerate(projections):
        for name in _FIELDS:
            tensors[f"layers.{i}.{name}"] = getattr(p, name).detach().float().contiguous()
    save_file(tensors, path, metadata={"format": "vllm-dar"})


def load_projections(model_dir: str, cfg: DarConfig) -> list[LayerProjections]:
    """Load and validate the projections against ``cfg`` (which was validated against the model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(model_dir, cfg.projection_file)
    if not os.path.isfile(path):
        raise DarConfigError(f"dar.projection_file: {path} does not exist")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DarConfigError(f"dar.projection_file: {path} is not a readable safetensors file ({e})") from e
    wanted = {f"layers.{i}.{name}" for i in range(cfg.shape.num_layers) for name in _FIELDS}
    extra = sorted(tensors.keys() - wanted)
    if extra:
        raise DarConfigError(f"{path}: unexpected tensor(s) {extra[:3]} (the dar section has "
                             f"{cfg.shape.num_layers} layers of {', '.join(_FIELDS)})")
    out = []
    for i in range(cfg.shape.num_layers):
        fields = {}
        for name, shape in expected_shapes(cfg, i).items():
            key = f"layers.{i}.{name}"
            t = tensors.get(key)
            if t is None:
                raise DarConfigError(f"{path}: tensor {key} is missing")
            if t.dtype not in _DTYPES:
                raise DarConfigError(f"{path}: tensor {key} has dtype {t.dtype}, not a floating type "
                                     f"({', '.join(str(d) for d in _DTYPES)})")
            if tuple(t.shape) != shape:
                raise DarConfigError(f"{path}: tensor {key} has shape {tuple(t.shape)}, the model and dar "
                                     f"section need {shape}")
            if not torch.isfinite(t).all():
                raise DarConfigError(f"{path}: tensor {key} has non-finite values")
            fields[name] = t.float()
        out.append(LayerProjections(**fields))
    return out


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    return read_json(path)


def load_dar(model_dir: str) -> tuple[DarConfig | None, list[LayerProjections] | None]:
    """(config, projections) of a DAR-converted checkpoint, or (None, None) for a stock one."""
    raw = read_config(model_dir)
    if "dar" not in raw:
        return None, None
    cfg = DarConfig.from_json(raw["dar"], ModelShape.from_hf_config(raw))
    return cfg, load_projections(model_dir, cfg)


def _replace_weights(src: str, tmp: str, weights: dict[str, torch.Tensor]) -> None:
    """Rewrite the top-level ``*.safetensors`` files of ``src`` into ``tmp`` with ``weights`` (checkpoint names)
    in place of the stored tensors, each cast to its stored dtype and shape-checked; every name must be found."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    left = dict(weights)
    for name in sorted(os.listdir(src)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(src, name), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata()
            if not left.keys() & set(keys):
                continue
            tensors = {k: f.get_tensor(k) for k in keys}
        for k in left.keys() & set(keys):
            new = left.pop(k)
            if tuple(new.shape) != tuple(tensors[k].shape):
                raise DarConfigError(f"trained weight {k}: shape {tuple(new.shape)} != the checkpoint's "
                                     f"{tuple(tensors[k].shape)}")
            tensors[k] = new.detach().to(tensors[k].dtype).contiguous()
        save_file(tensors, os.path.join(tmp, name), metadata=meta)
    if left:
        raise DarConfigError(f"trained weights not found in {src}'s safetensors files: {sorted(left)[:3]}")


def write_converted(src: str, out: str, cfg: DarConfig, projections: list[LayerProjections], *,
                    force: bool = False, weights: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``src``'s files plus the DAR section and projections to ``out``, atomically (``fill_converted`` in a
    staging folder that ``vllm_dar._fs.atomic_dir`` publishes)."""
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("OUT must differ from SRC: the source checkpoint is never modified")
    with atomic_dir(out, force=force, prefix=".convert-") as tmp:
        fill_converted(src, tmp, cfg, projections, weights=weights)
    return out


def fill_converted(src: str, folder: str, cfg: DarConfig, projections: list[LayerProjections], *,
                   weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the converted checkpoint's files into the empty ``folder`` (a caller's staging folder, published by
    it): ``src``'s files, ``config.json`` with the DAR section, the projections; ``weights`` (checkpoint tensor
    names) replace the source's tensors of those names (a healing run that trained attention weights)."""
    _check_projections(cfg, projections)
    raw = read_config(src)
    raw.pop("dar", None)
    raw["dar"] = cfg.to_json()
    for name in os.listdir(src):
        if name in ("config.json", "dar") or name.startswith("."):
            continue
        s = os.path.join(src, name)
        (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, os.path.join(folder, name))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    if weights:
        _replace_weights(src, folder, weights)
    proj_path = os.path.join(folder, cfg.projection_file)
    os.makedirs(os.path.dirname(proj_path), exist_ok=True)
    save_projections(proj_path, projections)


def _check_projections(cfg: DarConfig, projections: list[LayerProjections]) -> None:
    if len(projections) != cfg.shape.num_layers:
        raise DarConfigError(f"dar: {len(projections)} projection sets for {cfg.shape.num_layers} layers")
    for i, p in enumerate(projections):
        for name, shape in expected_shapes(cfg, i).items():
            if tuple(getattr(p, name).shape) != shape:
                raise DarConfigError(f"layers.{i}.{name}: shape {tuple(getattr(p, name).shape)} != {shape}")


def set_budget(model_dir: str, budget: BudgetConfig | None) -> DarConfig:
    """Replace (``None``: remove) the token budgets of the DAR-converted checkpoint at ``model_dir``, in place:
    nothing else in the checkpoint changes, and ``config.json`` is replaced atomically (written beside it, then
    renamed over it), so a killed run leaves the old or the new file. Returns the new, validated config."""
    raw = read_config(model_dir)
    if "dar" not in raw:
        raise DarConfigError(f"{model_dir}: config.json has no dar section (convert the model first: vllm-dar "
                             "convert)")
    cfg = DarConfig.from_json(raw["dar"], ModelShape.from_hf_config(raw))
    cfg = DarConfig(**{**cfg.__dict__, "budget": budget})  # validated against the model's layers
    raw["dar"] = cfg.to_json()
    path = os.path.join(model_dir, "config.json")
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(raw, f, indent=2)
    return cfg
