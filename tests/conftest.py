"""Shared fixtures: a policy file, a fake upstream, and the proxy app wired to both."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.settings import Settings
from tests.fakes import FakeUpstream

KEYS = {"clinic": "clinic-key", "chat": "chat-key", "tool": "tool-key"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


POLICY = f"""
upstreams:
  fake:
    base_url: http://upstream.test/v1
    api_key_env: FAKE_UPSTREAM_KEY
    timeouts: {{connect: 1, read: 1, total: 1}}
  fake-no-n:
    base_url: http://upstream.test/v1
    supports_n: false
models:
  sure: {{upstream: fake}}
  unsure: {{upstream: fake}}
  error-500: {{upstream: fake}}
  refuse-400: {{upstream: fake}}
  garbage: {{upstream: fake}}
  nochoices: {{upstream: fake}}
  slow: {{upstream: fake, keepalive_seconds: 0.2}}
  tool: {{upstream: fake}}
  alias: {{upstream: fake, upstream_model: sure}}
  json-judged: {{upstream: fake, upstream_model: unsure, judge_json: true}}
  agree: {{upstream: fake, upstream_model: sure, method: consistency, samples: 4, adaptive: false}}
  agree-no-n: {{upstream: fake-no-n, upstream_model: sure, method: consistency, samples: 4, adaptive: false}}
  agree-adaptive: {{upstream: fake, upstream_model: sure, method: consistency, samples: 8}}
  split: {{upstream: fake, method: consistency, samples: 4, adaptive: false}}
  split-majority: {{upstream: fake, upstream_model: split, method: consistency, samples: 4, adaptive: false, show: majority}}
  fail-samples: {{upstream: fake, method: consistency, samples: 4}}
  hybrid: {{upstream: fake, upstream_model: sure, method: hybrid, samples: 4, adaptive: false}}
defaults:
  threshold: 0.5
  action: abstain
  score: min_logprob
auth:
  unknown_keys: reject
tenants:
  clinic:
    api_key_sha256: ["{sha(KEYS["clinic"])}"]
    threshold: 0.9
    abstention_message: "Please ask a clinician."
  chat:
    api_key_sha256: ["{sha(KEYS["chat"])}"]
    action: hedge
    hedge_prefix: "Maybe: "
  tool:
    api_key_sha256: ["{sha(KEYS["tool"])}"]
    action: annotate
    streaming: passthrough
"""


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def make_client(policy_path: Path, fake: FakeUpstream) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        options: dict[str, Any] = {
            "policy": policy_path,
            "handle_signals": False,
            "reload_interval_seconds": 0,
        }
        options.update(settings)
        app = create_app(
            Settings(**options),
            transport=fake.transport(),
            registry=CollectorRegistry(),
            env={"FAKE_UPSTREAM_KEY": "sk-upstream-secret"},
        )
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def auth(tenant: str = "chat") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}
