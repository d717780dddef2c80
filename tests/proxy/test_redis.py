"""Two app instances sharing one real redis-server on loopback (ABSTAIN_REDIS_URL).

Each ``make_client`` is its own app, with its own metrics registry and event loop, like
two pods: feedback through one for a response of the other, limits that hold across
both, and Redis stopped, hung and restarted under them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from proxy.limits import Refusal
from proxy.policy.rules import Rule
from tests.conftest import auth
from tests.deploy.redis_server import RedisServer
from tests.fakes import FakeUpstream
from tests.proxy.test_limits import _with
from tests.proxy.test_metrics import value

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pods(
    make_client: Callable[..., TestClient], server: RedisServer
) -> Callable[..., tuple[TestClient, TestClient]]:
    def make(**settings: Any) -> tuple[TestClient, TestClient]:
        options = {"redis_url": server.url, "redis_retry_seconds": 0.2, **settings}
        return make_client(**options), make_client(**options)

    return make


def limiter_and_rule(client: TestClient) -> tuple[Any, Rule]:
    """The pod's shared limiter, and the rule of tenant "chat" for model "sure"."""
    state = client.app.state  # type: ignore[attr-defined]
    return state.limiter, state.store.current.rule("chat", "sure")


def settle(client: TestClient) -> None:
    """Wait for the app's background Redis writes (remembering a response, releasing)."""
    shared = client.app.state.shared_state  # type: ignore[attr-defined]
    client.portal.call(shared.settle)  # type: ignore[union-attr]


def ask(client: TestClient, tenant: str = "clinic", model: str = "sure") -> Any:
    return client.post("/v1/chat/completions", json={"model": model, **CHAT}, headers=auth(tenant))


def feedback(client: TestClient, rid: str, correct: bool = True, tenant: str = "clinic") -> Any:
    return client.post("/v1/feedback", json={"id": rid, "correct": correct}, headers=auth(tenant))


def fed(client: TestClient) -> float:
    return value(client, "abstain_feedback_total", tenant="clinic", model="sure")


def errors(client: TestClient, **labels: str) -> float:
    return value(client, "abstain_shared_state_errors_total", **labels)


def test_feedback_through_another_pod_is_counted_once(
    pods: Callable[..., tuple[TestClient, TestClient]], server: RedisServer
) -> None:
    a, b = pods()
    r = ask(a)
    assert r.status_code == 200
    rid = r.json()["id"]
    settle(a)
    first = feedback(b, rid)
    assert first.status_code == 200, first.text
    assert first.json()["recorded"] is True
    again = feedback(a, rid)  # a retry that lands on the other pod
    assert again.status_code == 200
    assert again.json()["recorded"] is False and again.json()["duplicate"] is True
    assert (fed(a), fed(b)) == (0, 1)
    other = feedback(b, rid, correct=False)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "feedback_conflict"
    assert "correct=true" in other.json()["error"]["message"]
    # Tenant-scoped: another tenant's feedback finds nothing, on either pod.
    assert feedback(a, rid, tenant="chat").status_code == 404
    assert feedback(b, "chatcmpl-never").status_code == 404
    # Stored with the TTL, under the tenant-scoped key.
    client = redis.Redis.from_url(server.url)
    key = f"abstain:fb:clinic:{rid}"
    assert 0 < client.ttl(key) <= 86_400
    assert client.hget(key, "fb:0") == b"1"
    client.close()


def test_concurrent_identical_feedback_on_both_pods_records_one(
    pods: Callable[..., tuple[TestClient, TestClient]],
) -> None:
    a, b = pods()
    body = ask(a).json()
    settle(a)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: feedback((a, b)[i % 2], body["id"]), range(8)))
    assert all(r.status_code == 200 for r in results)
    assert sum(r.json()["recorded"] for r in results) == 1
    assert fed(a) + fed(b) == 1


def test_the_feedback_ttl_is_the_setting(
    pods: Callable[..., tuple[TestClient, TestClient]], server: RedisServer
) -> None:
    a, _ = pods(feedback_ttl_seconds=1)
    rid = ask(a).json()["id"]
    settle(a)
    client = redis.Redis.from_url(server.url)
    assert client.ttl(f"abstain:fb:clinic:{rid}") == 1
    client.close()
    time.sleep(1.2)
    assert feedback(a, rid).status_code == 404


def test_a_tenant_rate_limit_holds_across_both_pods(
    pods: Callable[..., tuple[TestClient, TestClient]], policy_path: Path
) -> None:
    # A bucket of 4 that refills one token in 1000 s: exactly 4 admitted, wherever.
    _with(policy_path, chat="    rate_limit_per_second: 0.001\n    rate_limit_burst: 4\n")
    a, b = pods()
    statuses = [ask((a, b)[i % 2], tenant="chat").status_code for i in range(10)]
    assert statuses.count(200) == 4, statuses
    assert statuses.count(429) == 6
    refused = ask(b, tenant="chat")
    assert int(refused.headers["retry-after"]) >= 999
    limited = sum(
        value(c, "abstain_limited_requests_total", tenant="chat", limit="rate_limit_per_second")
        for c in (a, b)
    )
    assert limited == 7
    # Another tenant has its own bucket; one without limits never touches Redis.
    assert ask(a, tenant="clinic").status_code == 200
    assert errors(a) == errors(b) == 0


def test_n_requests_per_second_hold_across_both_pods(
    pods: Callable[..., tuple[TestClient, TestClient]], policy_path: Path
) -> None:
    _with(policy_path, chat="    rate_limit_per_second: 10\n    rate_limit_burst: 1\n")
    a, b = pods()
    admitted = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        for c in (a, b):
            admitted += ask(c, tenant="chat").status_code == 200
    elapsed = time.monotonic() - started
    # One token at start, then 10 a second: both pods together, not 10 each.
    assert admitted <= 1 + 10 * elapsed + 1, (admitted, elapsed)
    assert admitted >= 5


def test_far_from_its_limit_a_request_goes_on_while_redis_decides(
    pods: Callable[..., tuple[TestClient, TestClient]], policy_path: Path
) -> None:
    # A bucket of 20 that does not refill: overlapping while 5 or more are known left.
    _with(policy_path, chat="    rate_limit_per_second: 0.001\n    rate_limit_burst: 20\n")
    a, _ = pods()
    limiter, rule = limiter_and_rule(a)

    async def overlaps() -> list[bool]:
        # Unknown headroom: wait. Then each answer says how many are left.
        first = limiter.acquire_overlapped("chat", rule, time.monotonic())
        assert first is None
        got = await limiter.acquire_async("chat", rule, time.monotonic())
        assert not isinstance(got, Refusal)
        seen = []
        for _ in range(19):
            pending = limiter.acquire_overlapped("chat", rule, time.monotonic())
            seen.append(pending is not None)
            got = await (pending or limiter.acquire_async("chat", rule, time.monotonic()))
            assert not isinstance(got, Refusal)
        refused = await limiter.acquire_async("chat", rule, time.monotonic())
        assert isinstance(refused, Refusal)  # 20 admitted, overlapped or not, then no more
        assert limiter.acquire_overlapped("chat", rule, time.monotonic()) is None
        return seen

    seen = a.portal.call(overlaps)  # type: ignore[union-attr]
    # 19, 18, ... 5 left when asked: 15 overlapped; with 4 or fewer left each one waits.
    assert seen == [True] * 15 + [False] * 4


def drained_behind_its_back(
    pods: Callable[..., tuple[TestClient, TestClient]], policy_path: Path, server: RedisServer
) -> TestClient:
    """A pod whose last answer left the tenant "chat" 19 of 20 tokens, and a bucket that
    other pods have emptied since."""
    _with(policy_path, chat="    rate_limit_per_second: 0.001\n    rate_limit_burst: 20\n")
    a, _ = pods()
    assert ask(a, tenant="chat").status_code == 200
    redis.Redis.from_url(server.url).hset("abstain:limit:chat:bucket", "tokens", "0")
    return a


def test_an_overlapped_request_refused_by_redis_is_a_429_and_its_upstream_call_stops(
    pods: Callable[..., tuple[TestClient, TestClient]],
    policy_path: Path,
    server: RedisServer,
    fake: FakeUpstream,
) -> None:
    a = drained_behind_its_back(pods, policy_path, server)
    body = {"model": "slow", "x_sleep": 60, **CHAT}
    r = a.post("/v1/chat/completions", json=body, headers=auth("chat"))
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # The upstream call had started (the request did not wait) and was cancelled.
    assert fake.requests[-1]["model"] == "slow"
    assert fake.cancelled == 1
    limited = value(
        a, "abstain_limited_requests_total", tenant="chat", limit="rate_limit_per_second"
    )
    assert limited == 1
    assert value(a, "abstain_limit_late_refusals_total", tenant="chat") == 1
    assert value(a, "abstain_in_flight_requests", tenant="chat") == 0
    assert ask(a, tenant="chat").status_code == 429  # and the next one waits for Redis


def test_a_stream_waits_for_an_overlapped_check_before_its_upstream_call(
    pods: Callable[..., tuple[TestClient, TestClient]],
    policy_path: Path,
    server: RedisServer,
    fake: FakeUpstream,
) -> None:
    a = drained_behind_its_back(pods, policy_path, server)
    calls = len(fake.requests)
    body = {"model": "sure", "stream": True, **CHAT}
    r = a.post("/v1/chat/completions", json=body, headers=auth("chat"))
    assert r.status_code == 429, r.text  # a status, not an event in a started stream
    assert len(fake.requests) == calls  # no upstream call was begun for it
    assert value(a, "abstain_limit_late_refusals_total", tenant="chat") == 0
    limited = value(
        a, "abstain_limited_requests_total", tenant="chat", limit="rate_limit_per_second"
    )
    assert limited == 1
    assert value(a, "abstain_in_flight_requests", tenant="chat") == 0


def test_a_concurrency_slot_held_on_one_pod_refuses_on_the_other(
    pods: Callable[..., tuple[TestClient, TestClient]], policy_path: Path
) -> None:
    _with(policy_path, chat="    max_concurrent_requests: 1\n")
    a, b = pods()
    limiter, rule = limiter_and_rule(a)
    held = a.portal.call(limiter.acquire_async, "chat", rule, time.monotonic())  # type: ignore[union-attr]
    refused = ask(b, tenant="chat")
    assert refused.status_code == 429
    assert "concurrent" in refused.json()["error"]["message"]
    a.portal.call(held.release)  # type: ignore[union-attr]
    settle(a)
    # Sequential requests on either pod each give their slot back.
    for c in (b, a, b, a):
        assert ask(c, tenant="chat").status_code == 200
        settle(c)


def test_a_lease_whose_pod_died_expires(
    pods: Callable[..., tuple[TestClient, TestClient]], policy_path: Path
) -> None:
    _with(policy_path, chat="    max_concurrent_requests: 1\n")
    a, b = pods(redis_lease_seconds=0.5)
    limiter, rule = limiter_and_rule(a)
    a.portal.call(limiter.acquire_async, "chat", rule, time.monotonic())  # type: ignore[union-attr]
    assert ask(b, tenant="chat").status_code == 429  # never released: the pod "died"
    time.sleep(0.6)
    assert ask(b, tenant="chat").status_code == 200


def test_redis_down_serves_locally_counts_and_recovers(
    pods: Callable[..., tuple[TestClient, TestClient]], server: RedisServer, policy_path: Path
) -> None:
    _with(policy_path, chat="    rate_limit_per_second: 1000\n")
    a, b = pods()
    assert ask(a, tenant="chat").status_code == 200
    assert value(a, "abstain_shared_state_up") == 1
    server.stop()
    for _ in range(5):  # served throughout, limits decided locally
        assert ask(a, tenant="chat").status_code == 200
    rid = ask(a).json()["id"]
    settle(a)
    refused = feedback(b, rid)
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "shared_state_unavailable" and "Redis" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert errors(a, operation="limit_acquire") >= 1
    assert errors(a, operation="limit_acquire") == 5  # failed, or skipped while backing off
    assert errors(a, operation="feedback_remember") == 6  # those responses are not remembered
    assert errors(b, operation="feedback_lookup") == 1
    assert value(a, "abstain_shared_state_up") == 0
    server.start()  # same port, empty (no persistence)
    time.sleep(0.25)  # past the retry interval
    assert ask(a, tenant="chat").status_code == 200
    rid = ask(a).json()["id"]
    settle(a)
    assert feedback(b, rid).status_code == 200
    assert value(a, "abstain_shared_state_up") == value(b, "abstain_shared_state_up") == 1


def test_a_hung_redis_costs_at_most_the_timeout_and_recovers(
    pods: Callable[..., tuple[TestClient, TestClient]], server: RedisServer, policy_path: Path
) -> None:
    _with(policy_path, chat="    rate_limit_per_second: 1000\n")
    a, b = pods(redis_timeout_seconds=0.05, redis_retry_seconds=0.3)
    assert ask(a, tenant="chat").status_code == 200
    server.pause()  # accepts connections, answers nothing
    try:
        # Served throughout: the first request pays the 50 ms deadline, the rest skip
        # Redis during the back-off (how long they take is benchmarks' business).
        for _ in range(6):
            assert ask(a, tenant="chat").status_code == 200
        assert errors(a, operation="limit_acquire") >= 1
        assert feedback(b, "chatcmpl-x").status_code == 503
    finally:
        server.resume()
    time.sleep(0.35)
    assert ask(a, tenant="chat").status_code == 200
    rid = ask(a).json()["id"]
    settle(a)
    assert feedback(b, rid).status_code == 200


def test_without_a_url_nothing_is_shared(client: TestClient) -> None:
    assert client.app.state.shared_state is None  # type: ignore[attr-defined]
    assert value(client, "abstain_shared_state_up") == 0


def test_a_sentences_feedback_through_another_pod_is_claimed_once(
    make_client: Callable[..., TestClient], server: RedisServer, tmp_path: Path
) -> None:
    from tests.conftest import POLICY

    policy = tmp_path / "sentences.yaml"
    line = "  sure: {upstream: fake}\n"
    policy.write_text(POLICY.replace(line, line + "  parts: {upstream: fake, "
                                     "upstream_model: sure, granularity: sentence}\n"))  # fmt: skip
    a, b = (make_client(policy=policy, redis_url=server.url) for _ in range(2))
    r = ask(a, model="parts")
    assert r.status_code == 200
    rid = r.json()["id"]
    assert r.json()["choices"][0]["abstention"]["sentences"]
    settle(a)
    send = {"id": rid, "correct": True, "sentence": 0}
    first = b.post("/v1/feedback", json=send, headers=auth("clinic"))
    assert first.status_code == 200, first.text
    assert first.json()["recorded"] is True
    again = a.post("/v1/feedback", json=send, headers=auth("clinic"))
    assert again.json()["duplicate"] is True
    whole = a.post("/v1/feedback", json={"id": rid, "correct": False}, headers=auth("clinic"))
    assert whole.json()["recorded"] is True  # the answer is labelled apart
    assert value(b, "abstain_sentence_feedback_total", model="parts") == 1
    client = redis.Redis.from_url(server.url)
    key = f"abstain:fb:clinic:{rid}"
    assert (client.hget(key, "fb:0:0"), client.hget(key, "fb:0")) == (b"1", b"0")
    client.close()
