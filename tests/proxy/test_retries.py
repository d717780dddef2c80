"""Retries and the circuit breaker through the real app, against the fake upstream.

The fake's 503s carry ``Retry-After: 0``, so the proxy's waits are ``sleep(0)``: no test
here really sleeps.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.policy.schema import UpstreamConfig
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.resilience import ResilientUpstream
from proxy.upstream.wire import HttpxWire
from tests.conftest import auth
from tests.fakes import FakeUpstream
from tests.proxy.test_errors import assert_openai_error
from tests.proxy.test_metrics import value

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class Flaky(FakeUpstream):
    """The fake upstream, but its first ``failures`` requests answer 503."""

    def __init__(self, failures: int = 1) -> None:
        super().__init__()
        self.failures = failures

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.failures > 0:
            self.failures -= 1
            self.requests.append({})
            return httpx.Response(
                503, json={"error": {"message": "overloaded"}}, headers={"retry-after": "0"}
            )
        return await super().__call__(request)


@pytest.fixture
def fake() -> Flaky:
    return Flaky()


def with_metrics(client: TestClient) -> TestClient:
    # Until proxy/app.py passes its Metrics to UpstreamPool, attach them here.
    pool = client.app.state.upstreams  # type: ignore[attr-defined]
    if pool._metrics is None:
        pool._metrics = client.app.state.metrics  # type: ignore[attr-defined]
    return client


def test_a_503_then_200_gives_the_client_200_and_counts_one_retry(
    client: TestClient, fake: Flaky
) -> None:
    with_metrics(client)
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    assert r.status_code == 200, r.text
    assert len(fake.requests) == 2
    assert value(client, "abstain_upstream_retries_total", upstream="fake",
                 reason="status_503") == 1  # fmt: skip
    assert value(client, "abstain_upstream_retries_total") == 1


def test_a_stream_is_retried_before_its_first_byte(client: TestClient, fake: Flaky) -> None:
    body = {"model": "sure", "stream": True, **CHAT}
    r = client.post("/v1/chat/completions", json=body, headers=auth("tool"))  # passthrough
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    assert len(fake.requests) == 2
    assert fake.requests[-1].get("stream") is True


def test_a_rejected_request_is_not_retried(client: TestClient, fake: Flaky) -> None:
    fake.failures = 0
    r = client.post("/v1/chat/completions", json={"model": "refuse-400", **CHAT}, headers=auth())
    assert_openai_error(r, 400)
    assert len(fake.requests) == 1


def test_the_breaker_opens_and_fails_fast_with_503(client: TestClient, fake: Flaky) -> None:
    with_metrics(client)
    fake.failures = 100
    # 3 attempts (2 retries) per request; the 5th consecutive failure opens the breaker
    for _ in range(2):
        r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
        assert_openai_error(r, 503, "upstream_unavailable")  # the upstream's own 503
    assert len(fake.requests) == 5
    r = client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    assert_openai_error(r, 503, "upstream_unavailable")
    assert 1 <= int(r.headers["retry-after"]) <= 30  # the rest of the 30 s cool-down
    assert len(fake.requests) == 5  # failed fast
    assert value(client, "abstain_upstream_circuit_state", upstream="fake") == 2
    # the other upstream has its own breaker
    client.post("/v1/chat/completions", json={"model": "agree-no-n", **CHAT}, headers=auth())
    assert len(fake.requests) > 5  # called, not failed fast


def config(**extra: Any) -> UpstreamConfig:
    return UpstreamConfig.model_validate({"base_url": "http://upstream.test/v1", **extra})


def test_a_breaker_survives_a_reload_that_leaves_its_upstream_unchanged() -> None:
    pool = UpstreamPool(HttpxWire(httpx.AsyncHTTPTransport()), {})
    pool.rebuild({"a": config(), "b": config()})
    a, b = pool.get("a"), pool.get("b")
    assert isinstance(a, ResilientUpstream) and isinstance(b, ResilientUpstream)
    pool.rebuild({"a": config(), "b": config(circuit_breaker={"failure_threshold": 2})})
    a2, b2 = pool.get("a"), pool.get("b")
    assert isinstance(a2, ResilientUpstream) and isinstance(b2, ResilientUpstream)
    assert a2.breaker is a.breaker
    assert b2.breaker is not b.breaker
    assert b2.breaker.config.failure_threshold == 2
