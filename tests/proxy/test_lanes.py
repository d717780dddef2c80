"""The completion endpoints, served ahead of FastAPI's middleware, fail as FastAPI would.

:class:`~proxy.app.ProxyApp` answers ``POST`` on the two completion paths itself; with
OpenTelemetry on, FastAPI serves them. Either way a bug in the proxy is a 500 in
OpenAI's shape with no internals, it is logged, and the next request is served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from proxy.pipeline import Pipeline
from tests.conftest import auth

CHAT = {"model": "sure", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("opentelemetry", [False, True], ids=["lane", "through-fastapi"])
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "sure", "prompt": "hi"}),
])  # fmt: skip
def test_a_bug_in_the_proxy_is_a_500_in_openai_shape_and_the_next_request_is_served(
    make_client: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    opentelemetry: bool,
    path: str,
    body: dict[str, Any],
) -> None:
    client = make_client(opentelemetry=opentelemetry)
    real = Pipeline.complete

    async def broken(self: Pipeline, call: Any) -> Any:
        raise RuntimeError("secret internals sk-upstream-secret")

    monkeypatch.setattr(Pipeline, "complete", broken)
    with caplog.at_level(logging.ERROR, logger="abstain"):
        r = client.post(path, json=body, headers=auth())
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "Internal error in the proxy."
    assert "secret" not in r.text
    assert any(rec.message == "unhandled error" for rec in caplog.records)
    monkeypatch.setattr(Pipeline, "complete", real)
    assert client.post(path, json=body, headers=auth()).status_code == 200


@pytest.mark.parametrize("opentelemetry", [False, True], ids=["lane", "through-fastapi"])
def test_a_refused_request_is_the_same_error_either_way(
    make_client: Callable[..., TestClient], opentelemetry: bool
) -> None:
    client = make_client(opentelemetry=opentelemetry)
    r = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer no"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/chat/completions", content=b"{", headers=auth())
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
