"""Loader fuzzing (hypothesis): malformed ``dar`` sections, model configs and projection files are refused with
``DarConfigError`` naming the field or the file, never accepted and never another exception.

Each property starts from a valid tiny checkpoint (2 layers, 4 heads, 2 KV heads, head_dim 8, written to a fresh
temporary folder per example: no model weights, only ``config.json`` and the projections) and breaks it in ways
chosen by hypothesis. ``EXAMPLES`` bounds the cases tried by the properties below (hypothesis stops a property early once it has
tried every value of a small space).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_dar.checkpoint import expected_shapes, load_dar
from vllm_dar.config import DarConfig, DarConfigError, ModelShape

SHAPE = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
HF = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "hidden_size": 32, "head_dim": 8}
VALID = {"format_version": 1, "method": "pca", "head_sharing": "per_head", "sink_tokens": 1,
         "projection_file": "dar/projections.safetensors", "window": [4, 4], "key_rank": [2, 3],
         "value_rank": [3, 2], "extra": {}}
LISTS = ("window", "key_rank", "value_rank")
CONFIG_EXAMPLES, OBJECT_EXAMPLES, SHAPE_EXAMPLES, FILE_EXAMPLES, DISAGREE_EXAMPLES = 400, 50, 150, 300, 50
EXAMPLES = CONFIG_EXAMPLES + OBJECT_EXAMPLES + SHAPE_EXAMPLES + FILE_EXAMPLES + DISAGREE_EXAMPLES  # at most
FUZZ = {"deadline": None, "derandomize": True, "suppress_health_check": [HealthCheck.too_slow]}

# Any JSON value, and JSON values that are not (non-bool) integers.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
not_ints = json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
not_strings = json_values.filter(lambda v: not isinstance(v, str))


def test_the_base_checkpoint_loads():
    """The unbroken checkpoint the properties start from is accepted (else every refusal would be vacuous)."""
    with tempfile.TemporaryDirectory() as d:
        cfg, proj = load_dar(write_checkpoint(d))
        assert cfg.key_rank == (2, 3) and len(proj) == 2


# ---- the dar section -----------------------------------------------------------------------------------------

def bad_list(name: str):
    """A per-layer list that is malformed: not a list, wrong length, or one bad entry (wrong type, out of range)."""
    lo = 0 if name == "window" else 1
    hi = SHAPE.head_dim  # per_head: a group's projection input width
    bad_entry = not_ints | st.integers(max_value=lo - 1)
    if name != "window":
        bad_entry = bad_entry | st.integers(min_value=hi + 1)
    wrong_length = st.lists(st.integers(lo, hi), max_size=5).filter(lambda v: len(v) != SHAPE.num_layers)
    one_bad = st.tuples(st.integers(0, SHAPE.num_layers - 1), bad_entry).map(
        lambda ib: [ib[1] if i == ib[0] else VALID[name][i] for i in range(SHAPE.num_layers)])
    return json_values.filter(lambda v: not isinstance(v, list)) | wrong_length | one_bad


BAD_FIELDS = {
    "format_version": json_values.filter(lambda v: not (type(v) is int and v == 1)),
    "method": not_strings,
    "head_sharing": json_values.filter(lambda v: v not in ("per_head", "joint")),
    "sink_tokens": not_ints | st.integers(max_value=-1),
    "projection_file": not_strings | st.sampled_from(["", "/etc/passwd", "../x.safetensors", "dar/../../x",
                                                      "a\0b"]),
    "extra": json_values.filter(lambda v: not isinstance(v, dict)),
    **{name: bad_list(name) for name in LISTS},
}
mutation = (st.tuples(st.just("set"), st.sampled_from(sorted(BAD_FIELDS))).flatmap(
                lambda t: st.tuples(st.just(t[0]), st.just(t[1]), BAD_FIELDS[t[1]]))
            | st.tuples(st.just("drop"), st.sampled_from(["format_version", *LISTS]), st.none())
            | st.tuples(st.just("add"), st.text(min_size=1, max_size=8).filter(lambda k: k not in VALID), json_values))


def apply(section: dict, m) -> str:
    """Apply mutation ``m`` to ``section``; returns the text the refusal must contain."""
    kind, name, value = m
    if kind == "set":
        section[name] = value
        return f"dar.{name}"
    if kind == "drop":
        section.pop(name, None)
        return f"dar.{name}: missing"
    section[name] = value
    return "dar: unknown field(s)"


@settings(max_examples=CONFIG_EXAMPLES, **FUZZ)
@given(st.lists(mutation, min_size=1, max_size=3))
def test_malformed_dar_sections_are_refused(mutations):
    section = json.loads(json.dumps(VALID))
    names = [apply(section, m) for m in mutations]
    with pytest.raises(DarConfigError) as e:
        DarConfig.from_json(section, SHAPE)
    assert any(n.split(":")[0] in str(e.value) for n in names), (str(e.value), mutations)
    # the same through the checkpoint, from its config.json
    with tempfile.TemporaryDirectory() as d, pytest.raises(DarConfigError, match=r"dar[.:]"):
        load_dar(write_checkpoint(d, section=section))


@settings(max_examples=OBJECT_EXAMPLES, **FUZZ)
@given(st.sampled_from(["dar", "top"]), json_values.filter(lambda v: not isinstance(v, dict)))
def test_a_dar_section_or_config_that_is_not_an_object_is_refused(where, value):
    with tempfile.TemporaryDirectory() as d:
        path = write_checkpoint(d)
        raw = value if where == "top" else {**HF, "dar": value}
        Path(path, "config.json").write_text(json.dumps(raw))
        with pytest.raises(DarConfigError, match="config.json: expected a JSON object" if where == "top" else "dar"):
            load_dar(path)
        with pytest.raises(DarConfigError):
            DarConfig.from_model_dir(path)


def test_a_null_dar_section_is_refused_not_served_as_stock(tmp_path):
    """``"dar": null`` in config.json (vLLM's hf_config.dar is None) is a malformed section, not a stock model."""
    from types import SimpleNamespace

    from vllm_dar.plugin.model import served_dar_model

    path = write_checkpoint(str(tmp_path))
    Path(path, "config.json").write_text(json.dumps({**HF, "dar": None}))
    config = SimpleNamespace(model=path, revision=None, hf_config=SimpleNamespace(dar=None))
    with pytest.raises(DarConfigError, match="dar: expected an object, got NoneType"):
        served_dar_model(config)
    assert served_dar_model(SimpleNamespace(model=path, hf_config=SimpleNamespace())) is None  # no dar key: stock


# ---- the model's shape (config.json outside the dar section) --------------------------------------------------

SHAPE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


@settings(max_examples=SHAPE_EXAMPLES, **FUZZ)
@given(st.sampled_from(SHAPE_FIELDS), st.booleans(), not_ints | st.integers(max_value=0))
def test_malformed_model_shapes_are_refused(field, drop, value):
    raw = {**HF, "dar": VALID}
    if value is None and field in ("head_dim", "num_key_value_heads"):
        value = 0  # None means "derive it" (hidden_size // heads; one KV head per head), as dropping does below
    if drop:
        del raw[field]
        if field == "head_dim":
            del raw["hidden_size"]  # else head_dim comes from hidden_size // num_attention_heads
    else:
        raw[field] = value
    with tempfile.TemporaryDirectory() as d:
        path = write_checkpoint(d)
        Path(path, "config.json").write_text(json.dumps(raw))
        # without num_key_value_heads there are 4 (one per head): the projections, written for 2, are refused
        expected = "tensor layers.0.q_proj has shape" if drop and field == "num_key_value_heads" else field
        with pytest.raises(DarConfigError, match=f"config.json {expected}" if expected == field else expected):
            load_dar(path)


def test_a_config_that_is_not_json_is_refused(tmp_path):
    path = write_checkpoint(str(tmp_path))
    Path(path, "config.json").write_text('{"dar": {')
    for load in (load_dar, DarConfig.from_model_dir):
        with pytest.raises(DarConfigError, match="config.json: not valid JSON"):
            load(path)


# ---- the projection file -------------------------------------------------------------------------------------

def valid_tensors(cfg: DarConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.{name}": torch.randn(shape, generator=g)
            for i in range(cfg.shape.num_layers) for name, shape in expected_shapes(cfg, i).items()}


def write_checkpoint(d: str, *, section: dict | None = None, tensors: dict | None = None) -> str:
    """A model folder with config.json (the HF shape plus ``section``) and the projections (``tensors`` by name,
    default: valid ones for ``VALID``)."""
    Path(d, "config.json").write_text(json.dumps({**HF, "dar": VALID if section is None else section}))
    os.makedirs(os.path.join(d, "dar"), exist_ok=True)
    from safetensors.torch import save_file

    cfg = DarConfig.from_json(VALID, SHAPE)
    save_file(valid_tensors(cfg) if tensors is None else tensors, os.path.join(d, "dar", "projections.safetensors"),
              metadata={"format": "vllm-dar"})
    return d


KEYS = sorted(valid_tensors(DarConfig.from_json(VALID, SHAPE)))
BAD_DTYPES = (torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64)
tensor_damage = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(KEYS)),
    st.tuples(st.just("extra"), st.sampled_from(["layers.2.q_proj", "layers.-1.v_up", "layers.0.bias", "q_proj",
                                                 "layers.1.k_up", "layers.10.k_down"])),
    st.tuples(st.just("shape"), st.sampled_from(KEYS), st.integers(0, 2), st.sampled_from([-1, 1, 5])),
    st.tuples(st.just("rank"), st.sampled_from(KEYS), st.integers(1, 2)),  # drop or add a dimension
    st.tuples(st.just("nonfinite"), st.sampled_from(KEYS), st.sampled_from([math.nan, math.inf, -math.inf]),
              st.integers(0, 10**6)),
    st.tuples(st.just("dtype"), st.sampled_from(KEYS), st.sampled_from(BAD_DTYPES)),
)
file_damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
    st.tuples(st.just("bytes"), st.binary(max_size=256)),
    st.tuples(st.just("pickle"), st.none()),
    st.tuples(st.just("torch.save"), st.none()),
    st.tuples(st.just("header"), st.sampled_from([b"{}", b'{"a": 1}', b"[1, 2]", (b'{"layers.0.q_proj": '
                                                  b'{"dtype": "F32", "shape": [2, 8, 2], "data_offsets": [0, 9]}}'),
                                                  b"\xff\xfe", b'{"__metadata__": 5}'])),
    st.tuples(st.just("missing"), st.none()),
    st.tuples(st.just("directory"), st.none()),
)


def damage_tensors(tensors: dict, m) -> str:
    """Break one tensor (or the key set) per ``m``; returns the text the refusal must contain."""
    kind, key = m[0], m[1]
    if kind == "drop":
        del tensors[key]
        return f"tensor {key} is missing"
    if kind == "extra":
        tensors[key] = torch.zeros(2)
        return "unexpected tensor(s)"
    t = tensors[key]
    if kind == "shape":
        dims = list(t.shape)
        dims[m[2]] = max(dims[m[2]] + m[3], 0) if dims[m[2]] + m[3] != dims[m[2]] else dims[m[2]] + 1
        tensors[key] = torch.zeros(dims)
    elif kind == "rank":
        tensors[key] = t.flatten(0, 1) if m[2] == 1 else t.unsqueeze(0)
    elif kind == "nonfinite":
        t = t.clone()
        t.view(-1)[m[3] % t.numel()] = m[2]
        tensors[key] = t
        return f"tensor {key} has non-finite values"
    elif kind == "dtype":
        tensors[key] = torch.ones(t.shape).to(m[2])
        return f"tensor {key} has dtype"
    return f"tensor {key} has shape"


def damage_file(path: str, m) -> str:
    kind, arg = m
    if kind == "truncate":
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:int(arg * len(data))])
    elif kind == "bytes":
        Path(path).write_bytes(arg)
    elif kind == "pickle":
        Path(path).write_bytes(pickle.dumps({"layers.0.q_proj": [1.0]}))
    elif kind == "torch.save":
        torch.save({"layers.0.q_proj": torch.zeros(2)}, path)
    elif kind == "header":
        Path(path).write_bytes(len(arg).to_bytes(8, "little") + arg)
        return ""  # an empty but valid file ("{}") is refused for its missing tensors
    elif kind == "missing":
        os.remove(path)
        return "does not exist"
    elif kind == "directory":
        os.remove(path)
        os.makedirs(path)
        return "does not exist"
    return "is not a readable safetensors file"


@settings(max_examples=FILE_EXAMPLES, **FUZZ)
@given(st.one_of(tensor_damage.map(lambda m: ("tensors", m)), file_damage.map(lambda m: ("file", m))))
def test_malformed_projection_files_are_refused(damage):
    where, m = damage
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dar", "projections.safetensors")
        if where == "tensors":
            tensors = valid_tensors(DarConfig.from_json(VALID, SHAPE))
            expected = damage_tensors(tensors, m)
            write_checkpoint(d, tensors=tensors)
        else:
            write_checkpoint(d)
            expected = damage_file(path, m)
        with pytest.raises(DarConfigError) as e:
            load_dar(d)
        assert path in str(e.value) and expected in str(e.value), (str(e.value), m)


@settings(max_examples=DISAGREE_EXAMPLES, **FUZZ)
@given(st.sampled_from(LISTS[1:]), st.integers(0, 1), st.integers(1, SHAPE.head_dim))
def test_a_section_that_disagrees_with_its_file_is_refused(name, layer, rank):
    """A valid section whose ranks differ from those the file was written for: refused naming the tensor."""
    section = json.loads(json.dumps(VALID))
    if section[name][layer] == rank:
        rank = rank % SHAPE.head_dim + 1
    section[name][layer] = rank
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, section=section)
        with pytest.raises(DarConfigError, match=rf"projections.safetensors: tensor layers\.{layer}\.\w+ has shape"):
            load_dar(d)


# ---- start-up refusal through the CLI ------------------------------------------------------------------------

@pytest.mark.slow
def test_vllm_dar_eval_refuses_a_malformed_checkpoint(tiny_llama, calib_text, tmp_path):
    """``vllm-dar eval`` on a converted checkpoint whose projections hold a NaN exits 2 before evaluating,
    naming the file and the tensor."""
    from safetensors.torch import load_file, save_file

    from vllm_dar.convert import convert

    out = str(tmp_path / "dar")
    convert(tiny_llama, out, window=8, key_rank=2, value_rank=2, sink_tokens=1, schedule="uniform",
            head_sharing="per_head", calib_files=calib_text, calib_tokens=256, context=64, progress=False)
    proj = os.path.join(out, "dar", "projections.safetensors")
    tensors = load_file(proj)
    tensors["layers.1.v_up"][0, 0, 0] = math.nan
    save_file(tensors, proj)
    cli = Path(sys.executable).parent / "vllm-dar"
    proc = subprocess.run([str(cli), "eval", out, "--text", *calib_text, "--context", "64", "--max-windows", "1",
                           "--quiet"], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"vllm-dar eval: error: {proj}: tensor layers.1.v_up has non-finite values" in proc.stderr, proc.stderr
