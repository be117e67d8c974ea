"""Real text for calibration and evaluation: Debian's ``python3.11-doc`` reStructuredText sources.

Files are split by a fixed rule into a calibration part and a held-out evaluation part, so the two never overlap.
"""
from __future__ import annotations

import glob
import os

DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
EVAL_EVERY = 8  # every 8th file (sorted by path) is held out for evaluation


def doc_files() -> list[str]:
    files = sorted(glob.glob(os.path.join(DOC_SOURCES, "**", "*.txt"), recursive=True))
    if not files:
        raise FileNotFoundError(
            f"no reStructuredText sources under {DOC_SOURCES}: install Debian's python3.11-doc "
            "(apt-get install python3.11-doc)"
        )
    return files


def split_files() -> tuple[list[str], list[str]]:
    """(calibration files, held-out evaluation files), disjoint and deterministic."""
    files = doc_files()
    held_out = [f for i, f in enumerate(files) if i % EVAL_EVERY == 0]
    calib = [f for i, f in enumerate(files) if i % EVAL_EVERY != 0]
    return calib, held_out


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
