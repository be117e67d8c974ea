"""Atomic writes under SIGKILL: ``vllm-dar convert``, ``heal`` and ``prepare-model`` run as subprocesses and are
killed at named points (``VLLM_DAR_TEST_KILL_AT``, a test-only hook in ``vllm_dar._fs.kill_point``) and after
seeded random delays. After every kill OUT is absent, the old OUT, or complete and equal to an uninterrupted run
(heal also: OUT holding only its run state, no ``config.json``); a staging folder left beside it never holds a
checkpoint at its root. A killed heal resumed with ``--resume`` ends with the uninterrupted run's projections
(``torch.equal``: same data order, Adam moments and schedule, same thread count)."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from vllm_dar.checkpoint import load_dar
from vllm_dar.heal import FINAL_STATE, STATE_FILE, HealSettings, heal, load_state

CTX = 64
HEAL_TOKENS = 5 * CTX
OLD = "OLD"  # marker file in a previous OUT that a forced run replaces
KILLED = -9


@dataclass
class Job:
    """One CLI run: to its end, to a kill point (``kill_at``, ``VLLM_DAR_TEST_KILL_AT``), or SIGKILLed ``after``
    seconds once ``once()`` holds (random kills timed from an event, not from the seconds of imports)."""

    args: list[str]
    kill_at: str | None = None
    once: Callable[[], bool] | None = None
    after: float = 0.0


def run_all(jobs: list[Job], timeout: float = 300) -> list[int]:
    """Run the jobs at once (the seconds of imports overlap) and return their exit statuses (-9: killed)."""
    procs, fired = [], [None] * len(jobs)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in jobs]
        for j, log in zip(jobs, logs):
            env = {k: v for k, v in os.environ.items() if k != "VLLM_DAR_TEST_KILL_AT"}
            env.update({"VLLM_DAR_TEST_KILL_AT": j.kill_at} if j.kill_at else {})
            procs.append(subprocess.Popen([sys.executable, "-m", "vllm_dar.cli", *j.args, "--quiet"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=log))
        t_end = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < t_end, "a CLI run took too long"
            for i, (j, p) in enumerate(zip(jobs, procs)):
                if j.once is not None and p.poll() is None:
                    if fired[i] is None and j.once():
                        fired[i] = time.monotonic()
                    if fired[i] is not None and time.monotonic() - fired[i] >= j.after:
                        p.kill()
            time.sleep(0.005)
        for j, p, log in zip(jobs, procs, logs):
            log.seek(0)
            assert p.returncode in (0, KILLED), (j.args, log.read().decode()[-2000:])
    return [p.returncode for p in procs]


def projections_equal(a: str, b: str) -> bool:
    """Same dar section (but its ``extra`` record of timings) and bit-identical projections."""
    (ca, pa), (cb, pb) = load_dar(a), load_dar(b)
    return {**ca.to_json(), "extra": None} == {**cb.to_json(), "extra": None} and all(
        torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(pa, pb) for f in ("q_proj", "k_down", "v_down",
                                                                                    "v_up"))


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def check_out(out: str, reference: str, *, run_state: bool = False) -> str:
    """What a kill left at ``out``: "absent", "old" (the previous OUT, whole), "state" (heal: only its run state)
    or "complete" (loads; the uninterrupted run's projections and weights). Anything else fails; so does a
    staging folder beside ``out`` with a checkpoint at its root."""
    parent = os.path.dirname(out)
    for name in os.listdir(parent):
        if name.startswith("."):
            assert not os.path.exists(os.path.join(parent, name, "config.json")), f"{name} looks like a checkpoint"
    if not os.path.exists(out):
        return "absent"
    files = sorted(os.listdir(out))
    if "config.json" not in files:
        assert run_state and set(files) <= {STATE_FILE, STATE_FILE + ".tmp"} and STATE_FILE in files, files
        load_state(os.path.join(out, STATE_FILE))
        return "state"
    extra = {OLD, STATE_FILE, STATE_FILE + ".tmp"} if run_state else {OLD}  # a resumed heal saves its live state
    assert sorted(f for f in files if f not in extra) == sorted(os.listdir(reference))
    assert sorted(os.listdir(os.path.join(out, "dar"))) == sorted(os.listdir(os.path.join(reference, "dar")))
    assert projections_equal(out, reference)
    assert same_bytes(os.path.join(out, "model.safetensors"), os.path.join(reference, "model.safetensors"))
    return "old" if OLD in files else "complete"


# --- convert ---------------------------------------------------------------------------------------------------

CONVERT = {"window": 8, "key_rank": 2, "value_rank": 2, "sink_tokens": 1, "schedule": "uniform",
           "head_sharing": "per_head", "calib_tokens": 256, "context": CTX}


def convert_args(src: str, out: str, calib: list[str]) -> list[str]:
    args = ["convert", src, out, "--force", "--calib", *calib]
    for k, v in CONVERT.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def converted(tiny_llama, calib_text, tmp_path_factory) -> str:
    """The uninterrupted conversion, in this process (the same torch threads as the CLI's)."""
    from vllm_dar.convert import convert

    out = str(tmp_path_factory.mktemp("kill_ref") / "dar")
    convert(tiny_llama, out, calib_files=calib_text, progress=False, **CONVERT)
    return out


def old_out(reference: str, out: str) -> None:
    shutil.copytree(reference, out)
    open(os.path.join(out, OLD), "w").close()


def test_convert_killed(tiny_llama, calib_text, converted, tmp_path):
    """Four runs over an old OUT (--force), at once: killed with the new output built but not published (the old
    OUT stays), killed with it published and the old one not yet removed (the new OUT), and SIGKILLed a seeded
    random 0-30 ms after the staging folder appears (copying the weights, writing the projections, swapping,
    removing the old OUT take about that here; a run may end first): the old OUT or the new one, whole."""
    rng = random.Random(4)
    named = [("convert:staged", "old"), ("convert:published", "complete")]
    jobs, outs = [], []
    for i, point in enumerate([p for p, _ in named] + [None, None]):
        outs.append(str(tmp_path / f"run{i}" / "dar"))
        old_out(converted, outs[-1])
        parent = os.path.dirname(outs[-1])
        staging = (lambda d=parent: any(n.startswith(".convert-") for n in os.listdir(d)))
        jobs.append(Job(convert_args(tiny_llama, outs[-1], calib_text), kill_at=point,
                        once=None if point else staging, after=rng.uniform(0.0, 0.03)))
    codes = run_all(jobs)
    left = [check_out(out, converted) for out in outs]
    assert list(zip(codes, left))[:2] == [(KILLED, expect) for _, expect in named]
    print("convert random kills (delay s, exit status, OUT):",
          [(round(j.after, 3), c, o) for j, c, o in list(zip(jobs, codes, left))[2:]])


def test_replacing_without_the_atomic_swap(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, OUT is moved aside and replaced; nothing is left beside it."""
    from vllm_dar import _fs

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    monkeypatch.setattr(_fs, "_exchange", lambda a, b: False)
    with _fs.atomic_dir(str(out), force=True, prefix=".convert-") as new:
        (tmp_path / "x").write_text("")
        with open(os.path.join(new, "b"), "w") as f:
            f.write("new")
    assert os.listdir(out) == ["b"] and sorted(os.listdir(tmp_path)) == ["out", "x"]


# --- heal ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dar_tiny(tiny_llama, calib_text, tmp_path_factory) -> str:
    from vllm_dar.convert import convert

    out = str(tmp_path_factory.mktemp("kill_heal") / "dar")
    convert(tiny_llama, out, calib_files=calib_text, progress=False, **CONVERT)
    return out


def heal_args(dar: str, out: str, calib: list[str], *, resume: bool) -> list[str]:
    return ["heal", dar, out, "--context", str(CTX), "--max-tokens", str(HEAL_TOKENS), "--lr", "1e-2",
            "--save-every", "1", "--precision", "fp32", "--calib", *calib, "--resume" if resume else "--force"]


@pytest.fixture(scope="module")
def healed(dar_tiny, calib_text, tmp_path_factory) -> str:
    """The uninterrupted run, in this process (the same torch threads as the CLI's)."""
    out = str(tmp_path_factory.mktemp("kill_healed") / "out")
    settings = HealSettings(context=CTX, max_tokens=HEAL_TOKENS, lr=1e-2, save_every=1, precision="fp32")
    assert heal(dar_tiny, out, settings=settings, calib_files=calib_text, progress=False)["finished"]
    return out


def heal_job(dar: str, out: str, calib: list[str], **how) -> Job:
    """A heal run that resumes whatever run state OUT holds."""
    resume = os.path.isfile(os.path.join(out, STATE_FILE)) or os.path.isfile(os.path.join(out, FINAL_STATE))
    return Job(heal_args(dar, out, calib, resume=resume), **how)


def saved_again(out: str) -> Callable[[], bool]:
    """Whether OUT's live run state has been written since now."""
    path = os.path.join(out, STATE_FILE)
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else -1
    return lambda: os.path.exists(path) and os.stat(path).st_mtime_ns != before


def test_heal_killed_then_resumed_ends_as_an_uninterrupted_run(dar_tiny, calib_text, healed, tmp_path):
    """Two runs, their reruns side by side; each rerun resumes the run state OUT holds (or restarts without one).
    A: killed after its 2nd state save, between a state's .tmp write and its rename, with the output built but
    not published, and published with the old OUT (the live state) not yet removed. B: killed before its first
    state is published (no OUT), then SIGKILLed a seeded random 0-1.5 s after its next state save (training
    steps, saves, the final write: a run's 5 steps take about that here), twice. A last run finishes each (A's
    resumes its finished OUT), with the uninterrupted run's projections (torch.equal), weights and final state."""
    rng = random.Random(7)
    a_steps = [("heal:saved@2", "state"), ("heal:state-written@2", "state"), ("heal:staged", "state"),
               ("heal:published", "complete"), (None, "complete")]
    b_steps = [("heal-state:staged", None), (None, rng.uniform(0.0, 1.5)), (None, rng.uniform(0.0, 1.5)),
               (None, None)]
    a, b = str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")
    seen = []
    for i, (point, expect) in enumerate(a_steps):
        jobs = [heal_job(dar_tiny, a, calib_text, kill_at=point)]
        if i < len(b_steps):
            b_point, delay = b_steps[i]
            jobs.append(heal_job(dar_tiny, b, calib_text, kill_at=b_point, once=saved_again(b) if delay else None,
                                 after=delay or 0.0))
        codes = run_all(jobs)
        assert (codes[0], check_out(a, healed, run_state=True)) == (0 if point is None else KILLED, expect), point
        if point == "heal:state-written@2":
            assert os.path.isfile(os.path.join(a, STATE_FILE + ".tmp"))
        if len(codes) > 1:
            left = check_out(b, healed, run_state=True)
            step = load_state(os.path.join(b, STATE_FILE))["step"] if left == "state" else None
            seen.append((b_point or (delay and round(delay, 3)), codes[1], left, step))
    print("heal B kills (point or delay s, exit status, OUT, saved step):", seen)
    assert seen[0][1:3] == (KILLED, "absent") and seen[-1][1:3] == (0, "complete")
    for out in (a, b):
        state = load_state(os.path.join(out, FINAL_STATE))
        assert state["done"] and state["tokens"] == HEAL_TOKENS and state["step"] == HEAL_TOKENS // CTX


# --- prepare-model (the real GGUF) -----------------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_model_killed(default_model, tmp_path):
    """Over an old OUT: killed with the model built but not published (the old OUT stays whole), then a seeded
    random 0-1 s after the staging folder appears (old OUT or new, whole); an undisturbed run replaces it."""
    out = str(tmp_path / "smol")
    shutil.copytree(default_model, out)
    open(os.path.join(out, OLD), "w").close()
    args = ["prepare-model", "smollm2-135m", "--out", out, "--dtype", "float32", "--force"]
    assert run_all([Job(args, kill_at="prepare:staged")]) == [KILLED]
    assert OLD in os.listdir(out)
    staging = lambda: any(n.startswith(".prepare-") for n in os.listdir(tmp_path))
    rc = run_all([Job(args, once=staging, after=random.Random(3).uniform(0.0, 1.0))])
    for name in os.listdir(tmp_path):
        if name.startswith("."):
            assert not os.path.exists(os.path.join(tmp_path, name, "config.json"))
    files = set(os.listdir(out))
    assert files - {OLD} == set(os.listdir(default_model)) - {OLD}, (rc, files)
    assert run_all([Job(args)]) == [0] and OLD not in os.listdir(out)
    assert same_bytes(os.path.join(out, "model.safetensors"), os.path.join(default_model, "model.safetensors"))


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    from vllm_dar._fs import atomic_file

    path = tmp_path / "config.json"
    path.write_text("old")
    with atomic_file(str(path)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]
    with pytest.raises(RuntimeError), atomic_file(str(path)) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]  # old kept, no *.tmp left
