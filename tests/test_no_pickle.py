"""No code runs from a checkpoint or a heal run state: a crafted pickle (an object whose ``__reduce__`` writes a
marker file) placed where a run state or a projection file is expected is refused naming the file, and the marker
is never written. Run states load with ``torch.load(weights_only=True)``, projections with safetensors."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from vllm_dar.checkpoint import load_dar
from vllm_dar.config import DarConfigError
from vllm_dar.heal import FINAL_STATE, STATE_FILE, HealSettings, heal, load_state


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def write_payload(path: str, marker: str, how: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if how == "torch.save":  # the zip format a real run state has
        torch.save({"format": 1, "run": {}, "source": {}, "params": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)


def test_the_payload_is_live(tmp_path):
    """The payload does run under a plain unpickler (else the tests below would prove nothing)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.read_text() == "ran"


@pytest.fixture(scope="module")
def dar_tiny(tiny_llama, calib_text, tmp_path_factory) -> str:
    from vllm_dar.convert import convert

    out = str(tmp_path_factory.mktemp("nopickle") / "dar")
    convert(tiny_llama, out, window=8, key_rank=2, value_rank=2, sink_tokens=1, schedule="uniform",
            head_sharing="per_head", calib_files=calib_text, calib_tokens=256, context=64, progress=False)
    return out


@pytest.mark.parametrize("where", [STATE_FILE, FINAL_STATE])  # a live run's state; a finished run's
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_crafted_run_state_is_refused(dar_tiny, calib_text, tmp_path, how, where):
    out, marker = tmp_path / "healed", tmp_path / "ran"
    state = out / where
    write_payload(str(state), str(marker), how)
    settings = HealSettings(context=64, max_tokens=256, save_every=1, data_tokens=512)
    with pytest.raises(DarConfigError, match=f"--resume: {state} is not a heal run state"):
        heal(dar_tiny, str(out), settings=settings, calib_files=calib_text, progress=False, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a pickle", {"format": 2}, ["a", "list"]])
def test_other_non_states_are_refused(tmp_path, content):
    path = tmp_path / STATE_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DarConfigError, match=f"{path} is not a heal run state"):
        load_state(str(path))


def test_a_real_run_state_loads_without_pickle(dar_tiny, calib_text, tmp_path):
    """A saved state (tensors, Adam's state dict, history, settings) round-trips under weights_only=True."""
    out = tmp_path / "healed"
    settings = HealSettings(context=64, max_tokens=128, save_every=1, data_tokens=512)
    heal(dar_tiny, str(out), settings=settings, calib_files=calib_text, progress=False,
         on_step=lambda m: True)  # stop after the first step: only the live state is written
    state = load_state(str(out / STATE_FILE))
    assert state["step"] == 1 and isinstance(state["optim"]["state"], dict) and state["params"]


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_crafted_projection_file_is_refused(dar_tiny, tmp_path, how):
    model, marker = tmp_path / "model", tmp_path / "ran"
    shutil.copytree(dar_tiny, model)
    proj = model / "dar" / "projections.safetensors"
    proj.unlink()
    write_payload(str(proj), str(marker), how)
    with pytest.raises(DarConfigError, match=f"{proj} is not a readable safetensors file"):
        load_dar(str(model))
    assert not marker.exists()
