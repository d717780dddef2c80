"""What the proxy sends an upstream: the policy's key, and nothing an earlier answer set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.settings import Settings

POLICY = """
upstreams:
  up: {base_url: "http://upstream.test/v1", api_key_env: UP_KEY}
models:
  m: {upstream: up}
auth: {unknown_keys: default, default_tenant: t}
tenants: {t: {}}
"""

ANSWER = {
    "id": "c",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris"},
            "logprobs": {"content": [{"token": "Paris", "logprob": -0.1}]},
        }
    ],
}


@pytest.fixture
def seen(tmp_path: Path) -> Iterator[tuple[TestClient, list[httpx.Request]]]:
    requests: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        # A session cookie, as a gateway in front of a model API might set.
        headers = {"set-cookie": "session=tenant-a-secret; Path=/"}
        return httpx.Response(200, json=ANSWER, headers=headers)

    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    settings = Settings(policy=path, handle_signals=False, reload_interval_seconds=0)
    app = create_app(
        settings,
        transport=httpx.MockTransport(upstream),
        registry=CollectorRegistry(),
        env={"UP_KEY": "sk-upstream"},
    )
    with TestClient(app) as client:
        yield client, requests


def ask(client: TestClient) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}]}
    return client.post("/v1/chat/completions", json=body)


def test_a_cookie_an_upstream_set_is_never_sent_with_a_later_request(
    seen: tuple[TestClient, list[httpx.Request]],
) -> None:
    client, requests = seen
    assert ask(client).status_code == 200
    assert ask(client).status_code == 200
    assert len(requests) == 2
    # One transport serves every tenant: a kept cookie would cross from one to the next.
    assert "cookie" not in requests[1].headers


def test_the_upstream_gets_the_policy_key_and_a_json_body(
    seen: tuple[TestClient, list[httpx.Request]],
) -> None:
    client, requests = seen
    assert ask(client).status_code == 200
    sent = requests[0]
    assert sent.headers["authorization"] == "Bearer sk-upstream"
    assert sent.headers["content-type"] == "application/json"
    assert sent.url == httpx.URL("http://upstream.test/v1/chat/completions")
    assert json.loads(sent.content)["messages"][0]["content"] == "Capital of France?"
