"""Real text for calibration and evaluation: Debian's ``python3.11-doc`` reStructuredText sources, and text of
other domains that Debian packages ship as plain files (``DOMAINS``).

Files are split by a fixed rule into a calibration part and a held-out evaluation part, so the two never overlap.
A domain that is not ``trained`` is held out whole: nothing calibrates or trains on it (``mixed_train_files``
never lists it), so it measures how a conversion or a heal generalises beyond the text it saw.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
EVAL_EVERY = 8  # every 8th file (sorted by path) is held out for evaluation


@dataclass(frozen=True)
class Domain:
    """Files of one kind of text: ``pattern`` under ``root``, shipped by the Debian ``package``."""

    name: str
    root: str
    pattern: str
    package: str
    trained: bool  # False: evaluation only, never calibrated or trained on


DOMAINS = {d.name: d for d in (
    Domain("docs", DOC_SOURCES, "**/*.txt", "python3.11-doc", True),  # reStructuredText documentation
    Domain("code", "/usr/lib/python3.11", "*.py", "libpython3.11-stdlib", True),  # Python source
    Domain("release-notes", "/usr/share/doc/git/RelNotes", "*.txt", "git", True),  # changelog prose
    Domain("licenses", "/usr/share/common-licenses", "*", "base-files", False),  # legal text: never trained
)}


def domain_files(name: str) -> list[str]:
    """The domain's files, sorted by path (raises, naming the package to install, when there are none)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r}; one of {', '.join(DOMAINS)}")
    d = DOMAINS[name]
    files, seen = [], set()
    for f in sorted(glob.glob(os.path.join(d.root, d.pattern), recursive=True)):
        real = os.path.realpath(f)  # a link to another file of the domain (GPL -> GPL-3) is not more text
        if os.path.isfile(f) and real not in seen:
            files.append(f)
            seen.add(real)
    if not files:
        raise FileNotFoundError(f"no {name} text ({d.pattern} under {d.root}): install Debian's {d.package} "
                                f"(apt-get install {d.package})")
    return files


def missing_packages() -> list[str]:
    """Debian packages of the domains that have no files here (``scripts/setup.sh`` installs them)."""
    return [d.package for d in DOMAINS.values() if not glob.glob(os.path.join(d.root, d.pattern), recursive=True)]


def domain_split(name: str) -> tuple[list[str], list[str]]:
    """(training / calibration files, held-out evaluation files) of one domain, disjoint and deterministic: every
    ``EVAL_EVERY``-th file held out; a domain that is not ``trained``: ([], all of it)."""
    files = domain_files(name)
    if not DOMAINS[name].trained:
        return [], files
    return ([f for i, f in enumerate(files) if i % EVAL_EVERY != 0],
            [f for i, f in enumerate(files) if i % EVAL_EVERY == 0])


def mixed_train_files(names: list[str] | None = None) -> list[str]:
    """The training parts of ``names`` (default: every trained domain), interleaved file by file while every
    domain has files left, then the rest of the longer ones in turn: a token budget taken from the front
    (``token_windows``) draws from every domain."""
    names = names or [n for n, d in DOMAINS.items() if d.trained]
    parts = [domain_split(n)[0] for n in names]
    return [f for group in zip(*parts) for f in group] + [f for part in parts for f in part[min(map(len, parts)):]]


def doc_files() -> list[str]:
    return domain_files("docs")


def split_files() -> tuple[list[str], list[str]]:
    """(calibration files, held-out evaluation files) of the documentation, disjoint and deterministic."""
    return domain_split("docs")


def token_windows(tokenizer, files: list[str], *, context: int, max_windows: int | None = None,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Concatenate the files' tokens (an EOS between files) and cut them into windows of ``context`` tokens.

    The last partial window is dropped, so every window has exactly ``context`` tokens.
    """
    if max_tokens is not None:
        max_windows = min(max_windows or max_tokens // context, max(1, max_tokens // context))
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    windows: list[list[int]] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            stream.extend(tokenizer(f.read(), add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        while len(stream) >= context:
            windows.append(stream[:context])
            stream = stream[context:]
            if max_windows is not None and len(windows) >= max_windows:
                return windows
    if not windows:
        raise ValueError(f"the text has fewer than {context} tokens; pass a shorter --context or more text")
    return windows
