"""Fixtures shared by the evaluation tests: the fake model on loopback and its question set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.eval import fake_model


@pytest.fixture
def counter() -> fake_model.Counter:
    return fake_model.Counter()


@pytest.fixture
def model_url(counter: fake_model.Counter) -> Iterator[str]:
    with fake_model.serve(counter) as url:
        yield url


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return fake_model.write_dataset(tmp_path / "capitals.jsonl")
