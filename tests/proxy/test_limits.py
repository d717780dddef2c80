"""Per-tenant limits through the app: 400 for a costly request, 429 for a busy tenant."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import proxy.app
from proxy.admission import ReleasingBody
from proxy.limits import MemoryLimiter, Refusal
from tests.conftest import auth
from tests.fakes import FakeUpstream
from tests.proxy.test_errors import assert_openai_error
from tests.proxy.test_metrics import value

CHAT = {"messages": [{"role": "user", "content": "hi"}]}

#: 8 samples on an upstream without n: a request for n choices makes n + 8 calls.
COSTLY = (
    "  costly: {upstream: fake-no-n, upstream_model: sure, method: consistency, samples: 8,"
    " adaptive: false, max_upstream_calls: 12}\n"
)


def _with(policy_path: Path, *, models: str = "", defaults: str = "", chat: str = "") -> None:
    text = policy_path.read_text()
    text = text.replace("models:\n", "models:\n" + models, 1)
    text = text.replace("defaults:\n", "defaults:\n" + defaults, 1)
    text = text.replace('    hedge_prefix: "Maybe: "\n', '    hedge_prefix: "Maybe: "\n' + chat, 1)
    policy_path.write_text(text)


def _handler_sends_headers() -> bool:
    return "exc.headers()" in inspect.getsource(proxy.app._proxy_error)


def post(client: TestClient, tenant: str = "chat", **body: object):
    return client.post("/v1/chat/completions", json={"model": "sure", **CHAT, **body},
                       headers=auth(tenant))  # fmt: skip


# --- per request: 400 ---------------------------------------------------------------------


def test_n_above_max_n_is_400_naming_n(client: TestClient, fake: FakeUpstream) -> None:
    assert post(client, n=16).status_code == 200  # the default max_n
    sent = len(fake.requests)
    err = assert_openai_error(post(client, n=17), 400, "invalid_request")
    assert err["param"] == "n"
    assert "16" in err["message"]
    assert len(fake.requests) == sent  # refused before anything went upstream
    assert value(client, "abstain_limited_requests_total", tenant="chat", limit="max_n") == 1


def test_too_many_upstream_calls_is_400(
    make_client: Callable[..., TestClient], policy_path: Path, fake: FakeUpstream
) -> None:
    _with(policy_path, models=COSTLY)
    client = make_client()
    ok = post(client, model="costly", n=4)
    assert ok.status_code == 200, ok.text
    assert len(fake.requests) == 12  # the arithmetic matches what the proxy really sent
    err = assert_openai_error(post(client, model="costly", n=5), 400, "invalid_request")
    assert err["param"] == "n"
    assert "13 upstream calls" in err["message"]
    assert len(fake.requests) == 12
    limit = "max_upstream_calls"
    assert value(client, "abstain_limited_requests_total", tenant="chat", limit=limit) == 1


# --- per tenant: 429 ----------------------------------------------------------------------


@pytest.fixture
def rate_limited(make_client: Callable[..., TestClient], policy_path: Path) -> TestClient:
    # A burst of 2, then one token every 1000 s: the third request must wait 1000 s.
    _with(policy_path, chat="    rate_limit_per_second: 0.001\n    rate_limit_burst: 2\n")
    return make_client()


def test_the_rate_limit_is_429_in_openai_shape(rate_limited: TestClient) -> None:
    client = rate_limited
    assert [post(client).status_code for _ in range(2)] == [200, 200]
    r = post(client)
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    limit = "rate_limit_per_second"
    assert value(client, "abstain_limited_requests_total", tenant="chat", limit=limit) == 1
    assert value(client, "abstain_requests_total", tenant="chat", status="429") == 1
    # Another tenant has its own bucket (and no limit at all here).
    assert post(client, tenant="clinic").status_code == 200


@pytest.mark.xfail(
    not _handler_sends_headers(),
    reason="proxy/app.py _proxy_error must pass headers=exc.headers()",
    strict=True,
)
def test_the_rate_limit_sends_retry_after(rate_limited: TestClient) -> None:
    post(rate_limited)
    post(rate_limited)
    r = post(rate_limited)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) == 1000


def test_a_busy_tenant_gets_429_until_its_request_ends(
    make_client: Callable[..., TestClient], policy_path: Path
) -> None:
    _with(policy_path, chat="    max_concurrent_requests: 1\n")
    client = make_client()
    limiter = client.app.state.limiter = MemoryLimiter()  # type: ignore[attr-defined]
    rule = client.app.state.store.current.rule("chat", "sure")  # type: ignore[attr-defined]
    held = limiter.acquire("chat", rule, time.monotonic())  # a request still in flight
    assert not isinstance(held, Refusal)
    err = assert_openai_error(post(client), 429, "rate_limit_exceeded")
    assert "concurrent" in err["message"]
    limit = "max_concurrent_requests"
    assert value(client, "abstain_limited_requests_total", tenant="chat", limit=limit) == 1
    held.release()
    assert post(client).status_code == 200


@pytest.mark.parametrize(
    ("tenant", "body"),
    [
        ("chat", {}),  # non-streaming
        ("chat", {"stream": True}),  # buffer mode
        ("tool", {"stream": True}),  # passthrough mode
        ("chat", {"model": "error-500"}),  # upstream failure
        ("chat", {"model": "error-500", "stream": True}),
        ("tool", {"model": "error-500", "stream": True}),
        ("chat", {"model": "agree", "stream": True}),  # with samples
    ],
)
def test_a_concurrency_limit_of_one_admits_sequential_requests(
    make_client: Callable[..., TestClient], policy_path: Path, tenant: str, body: dict
) -> None:
    _with(policy_path, defaults="  max_concurrent_requests: 1\n")
    client = make_client()
    statuses = [post(client, tenant=tenant, **body).status_code for _ in range(4)]
    assert statuses[0] != 429
    assert statuses == statuses[:1] * 4  # every one admitted: each released its slot
    assert client.app.state.limiter.in_flight(tenant) == 0  # type: ignore[attr-defined]
    assert value(client, "abstain_in_flight_requests", tenant=tenant) == 0
    assert value(client, "abstain_limited_requests_total") == 0


# --- the stream body wrapper --------------------------------------------------------------


class _Releases:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


async def _chunks(fail: bool = False) -> AsyncIterator[bytes]:
    yield b"a"
    if fail:
        raise RuntimeError("mid-stream")
    yield b"b"


async def test_a_stream_body_releases_once_at_its_end() -> None:
    release = _Releases()
    body = ReleasingBody(_chunks(), release)
    assert [c async for c in body] == [b"a", b"b"]
    await body.aclose()
    assert release.count == 1


async def test_a_stream_body_releases_when_it_fails() -> None:
    release = _Releases()
    body = ReleasingBody(_chunks(fail=True), release)
    with pytest.raises(RuntimeError):
        async for _ in body:
            pass
    assert release.count == 1


async def test_a_stream_body_closed_early_releases_and_closes_the_inner_body() -> None:
    release = _Releases()
    inner = _chunks()
    body = ReleasingBody(inner, release)
    assert await anext(body) == b"a"
    assert release.count == 0
    await body.aclose()  # the client went away
    assert release.count == 1
    with pytest.raises(StopAsyncIteration):
        await anext(inner)


async def test_a_stream_body_never_iterated_releases_on_close() -> None:
    release = _Releases()
    body = ReleasingBody(_chunks(), release)
    await body.aclose()
    assert release.count == 1
