"""Atomic output folders: OUT is absent, the old OUT or the new, complete one, whatever kills the writer (SIGKILL
included), and nothing left beside it ever looks like a checkpoint.

The output is built in ``new/`` inside a hidden staging folder beside OUT (``.<prefix>XXXXXXXX``), whose root never
holds a checkpoint (no ``config.json``), so a staging folder a killed run leaves behind never loads as one.
Publishing swaps ``new`` with an existing OUT in one ``renameat2(RENAME_EXCHANGE)`` (Linux; an absent OUT is a
plain rename), so OUT is never missing or partial; where the swap is unsupported, OUT is renamed aside first, and
a kill between the two renames leaves no OUT. The old OUT then goes with the staging folder. A killed run's
staging folder stays (another run may be writing to its own); delete ``.convert-*``, ``.heal-*``, ``.prepare-*``
folders beside OUT when no vllm-dar command is running.

``kill_point`` is a test-only hook (``VLLM_DAR_TEST_KILL_AT``): ``tests/test_kill.py`` SIGKILLs the CLI there.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import tempfile

from . import envs

_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test-only: SIGKILL this process the N-th time it reaches ``name`` when ``VLLM_DAR_TEST_KILL_AT`` is
    ``name@N`` (or ``name``: the first time). Unset, as outside tests, it does nothing."""
    want = envs.VLLM_DAR_TEST_KILL_AT
    if want is None:
        return
    point, _, n = want.partition("@")
    if point == name:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C library
    or the file system has no such call."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _staging(out: str, prefix: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _publish(new: str, out: str, name: str) -> None:
    """Move the folder ``new`` (inside a staging folder) to ``out``; an existing ``out`` ends up in the staging
    folder."""
    if not os.path.lexists(out):
        os.rename(new, out)
    elif not _exchange(new, out):
        aside = os.path.join(os.path.dirname(new), "old")
        os.rename(out, aside)
        kill_point(f"{name}:aside")
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(aside, out)  # an error (not a kill) puts the old OUT back
            raise
    kill_point(f"{name}:published")


@contextlib.contextmanager
def atomic_dir(out: str, *, force: bool = False, prefix: str = ".vllm-dar-"):
    """Yield an empty folder to build ``out`` in; on success it replaces ``out``, on any error it is removed."""
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    name = prefix.strip(".-")
    stage = _staging(out, prefix)
    new = os.path.join(stage, "new")
    os.mkdir(new)
    try:
        yield new
        kill_point(f"{name}:staged")
        _publish(new, out, name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str, *, tmp: str | None = None):
    """Yield a path to write ``path``'s new contents to (``tmp``, default ``<path>.<pid>.tmp`` beside it); on
    success it is flushed to disk and renamed over ``path``, so a reader or a kill sees the old file or the new one,
    never part of one. On an error the temporary file is removed; a kill leaves it (named ``*.tmp``)."""
    tmp = tmp or f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def discard(path: str, *, prefix: str = ".vllm-dar-") -> None:
    """Remove the folder ``path``: renamed into a staging folder first, so a kill never leaves part of it."""
    stage = _staging(path, prefix)
    os.rename(path, os.path.join(stage, "old"))
    shutil.rmtree(stage, ignore_errors=True)
