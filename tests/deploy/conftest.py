"""Fixtures for the deployment tests: the fake upstream and a policy in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.fake_upstream import fake_upstream
from tests.deploy.procs import write_policy


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    with fake_upstream() as url:
        yield url


@pytest.fixture
def policy_file(tmp_path: Path, upstream_url: str) -> Path:
    return write_policy(tmp_path, upstream_url)
