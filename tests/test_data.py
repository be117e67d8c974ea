"""Text domains (``vllm_dar.data``): held-out files never overlap training files, and the untrained domain is
never read for calibration or training."""
from __future__ import annotations

import pytest

from vllm_dar import data


@pytest.mark.parametrize("name", list(data.DOMAINS))
def test_domain_splits_are_disjoint_and_cover_the_domain(name):
    train, held_out = data.domain_split(name)
    assert held_out and not set(train) & set(held_out)
    assert sorted(train + held_out) == data.domain_files(name)
    assert bool(train) == data.DOMAINS[name].trained


def test_mixed_training_text_interleaves_trained_domains_only():
    mixed = data.mixed_train_files()
    trained = [n for n, d in data.DOMAINS.items() if d.trained]
    assert sorted(mixed) == sorted(f for n in trained for f in data.domain_split(n)[0])
    owner = {f: n for n in trained for f in data.domain_files(n)}
    assert [owner[f] for f in mixed[: len(trained)]] == trained  # one file of each domain first
    untrained = {f for n, d in data.DOMAINS.items() if not d.trained for f in data.domain_files(n)}
    assert untrained and not untrained & set(mixed)


def test_documentation_split_is_the_docs_domain():
    assert data.split_files() == data.domain_split("docs")


def test_missing_or_unknown_domains_are_named(monkeypatch):
    monkeypatch.setitem(data.DOMAINS, "gone", data.Domain("gone", "/nonexistent", "*.txt", "some-package", True))
    assert data.missing_packages() == ["some-package"]  # what scripts/setup.sh installs
    with pytest.raises(FileNotFoundError, match="apt-get install some-package"):
        data.domain_files("gone")
    with pytest.raises(ValueError, match="unknown text domain 'nope'; one of docs, code"):
        data.domain_files("nope")
