"""Fixtures for the deployment tests: the fake upstream and a policy in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.procs import write_policy
from tests.e2e.procs import fake_upstream


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    # The same fake OpenAI-compatible server the end-to-end tests use (tests/fake_server.py).
    with fake_upstream() as url:
        yield url + "/v1"


@pytest.fixture
def policy_file(tmp_path: Path, upstream_url: str) -> Path:
    return write_policy(tmp_path, upstream_url)
