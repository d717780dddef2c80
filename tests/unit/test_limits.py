"""Per-tenant limits: the token bucket and concurrency on a fake clock, and call counting."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from proxy.admission import Admission
from proxy.errors import ProxyError, RateLimited
from proxy.limits import (
    Lease,
    MemoryLimiter,
    Refusal,
    burst_size,
    check_request,
    upstream_calls,
)
from proxy.metrics import Metrics
from proxy.policy.loading import parse_policy
from proxy.policy.rules import Rule
from proxy.policy.schema import RuleFields

POLICY = """
upstreams:
  up: {base_url: "http://127.0.0.1:9/v1"}
models:
  plain: {upstream: up}
  agree: {upstream: up, method: consistency, samples: 8, sample_round_size: 2, min_samples: 2}
  odd: {upstream: up, method: consistency, samples: 7, sample_round_size: 3, min_samples: 4}
  open: {upstream: up, max_concurrent_requests: 0, rate_limit_per_second: 0}
defaults: {max_concurrent_requests: 3, rate_limit_per_second: 2, rate_limit_burst: 5}
tenants:
  big: {max_n: 128, max_upstream_calls: 300}
"""


def rule(model: str = "plain", tenant: str | None = None, **changes: object) -> Rule:
    return dataclasses.replace(parse_policy(POLICY).rule(tenant, model), **changes)


# --- policy keys --------------------------------------------------------------------------


def test_limits_layer_and_zero_lifts_a_limit() -> None:
    plain = rule()
    assert (plain.max_n, plain.max_upstream_calls) == (16, 64)
    assert (plain.max_concurrent_requests, plain.rate_limit_per_second) == (3, 2.0)
    assert plain.rate_limit_burst == 5
    assert (rule(tenant="big").max_n, rule(tenant="big").max_upstream_calls) == (128, 300)
    lifted = rule("open")
    assert lifted.max_concurrent_requests is None
    assert lifted.rate_limit_per_second is None


def test_unset_limits_default_to_unlimited() -> None:
    bare = parse_policy("upstreams: {up: {base_url: 'http://x/v1'}}\nmodels: {m: {upstream: up}}")
    r = bare.rule(None, "m")
    assert (r.max_n, r.max_upstream_calls) == (16, 64)
    assert r.max_concurrent_requests is None
    assert r.rate_limit_per_second is None


@pytest.mark.parametrize(
    "field",
    [
        {"max_n": 0},
        {"max_n": 129},
        {"max_upstream_calls": 0},
        {"max_concurrent_requests": -1},
        {"rate_limit_per_second": -0.5},
        {"rate_limit_burst": 0},
    ],
)
def test_out_of_range_limits_are_rejected(field: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RuleFields(**field)  # type: ignore[arg-type]


# --- the token bucket ---------------------------------------------------------------------


def test_burst_then_refusal_with_the_time_to_the_next_token() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=None, rate_limit_per_second=2.0, rate_limit_burst=3)
    for _ in range(3):
        lease = limiter.acquire("t", r, 100.0)
        assert not isinstance(lease, Refusal)
        lease.release()
    refused = limiter.acquire("t", r, 100.0)
    assert isinstance(refused, Refusal)
    assert refused.limit == "rate_limit_per_second"
    assert refused.retry_after == pytest.approx(0.5)  # one token at 2/s
    # A quarter second later half a token is back: a quarter second still to wait.
    later = limiter.acquire("t", r, 100.25)
    assert isinstance(later, Refusal)
    assert later.retry_after == pytest.approx(0.25)


def test_the_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=None, rate_limit_per_second=2.0, rate_limit_burst=3)
    for _ in range(3):
        assert not isinstance(limiter.acquire("t", r, 0.0), Refusal)
    assert not isinstance(limiter.acquire("t", r, 0.5), Refusal)  # one token back
    assert isinstance(limiter.acquire("t", r, 0.5), Refusal)
    # A long pause refills to the burst, not beyond.
    admitted = [not isinstance(limiter.acquire("t", r, 1000.0), Refusal) for _ in range(5)]
    assert admitted == [True, True, True, False, False]


def test_a_refusal_spends_no_token_and_tenants_have_their_own_buckets() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=None, rate_limit_per_second=1.0, rate_limit_burst=1)
    assert not isinstance(limiter.acquire("a", r, 0.0), Refusal)
    for _ in range(10):
        assert isinstance(limiter.acquire("a", r, 0.0), Refusal)
    assert not isinstance(limiter.acquire("b", r, 0.0), Refusal)
    assert not isinstance(limiter.acquire("a", r, 1.0), Refusal)


def test_a_clock_stepping_back_refills_nothing() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=None, rate_limit_per_second=1.0, rate_limit_burst=1)
    assert not isinstance(limiter.acquire("t", r, 10.0), Refusal)
    assert isinstance(limiter.acquire("t", r, 5.0), Refusal)
    assert isinstance(limiter.acquire("t", r, 10.5), Refusal)
    assert not isinstance(limiter.acquire("t", r, 11.0), Refusal)


def test_the_default_burst_is_one_seconds_worth() -> None:
    assert burst_size(rule(rate_limit_per_second=2.5, rate_limit_burst=None)) == 3
    assert burst_size(rule(rate_limit_per_second=0.1, rate_limit_burst=None)) == 1


def test_no_rate_limit_admits_everything() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=None, rate_limit_per_second=None)
    assert all(not isinstance(limiter.acquire("t", r, 0.0), Refusal) for _ in range(1000))


# --- concurrency --------------------------------------------------------------------------


def test_concurrency_refuses_while_full_and_admits_after_a_release() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=2, rate_limit_per_second=None)
    first, second = limiter.acquire("t", r, 0.0), limiter.acquire("t", r, 0.0)
    assert not isinstance(first, Refusal) and not isinstance(second, Refusal)
    assert limiter.in_flight("t") == 2
    full = limiter.acquire("t", r, 0.0)
    assert isinstance(full, Refusal)
    assert full.limit == "max_concurrent_requests"
    assert full.retry_after > 0
    assert not isinstance(limiter.acquire("other", r, 0.0), Refusal)
    first.release()
    first.release()  # twice is once
    assert limiter.in_flight("t") == 1
    third = limiter.acquire("t", r, 0.0)
    assert not isinstance(third, Refusal)
    second.release()
    third.release()
    assert limiter.in_flight("t") == 0


def test_a_concurrency_refusal_spends_no_rate_token() -> None:
    limiter = MemoryLimiter()
    r = rule(max_concurrent_requests=1, rate_limit_per_second=1.0, rate_limit_burst=2)
    held = limiter.acquire("t", r, 0.0)
    assert not isinstance(held, Refusal)
    assert isinstance(limiter.acquire("t", r, 0.0), Refusal)
    held.release()
    assert not isinstance(limiter.acquire("t", r, 0.0), Refusal)  # the second token


# --- upstream calls -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "n", "supports_n", "main", "samples"),
    [
        ("plain", 1, True, 1, 0),
        ("plain", 12, True, 1, 0),
        ("plain", 12, False, 12, 0),
        # 8 samples in rounds of 2 with n: 4 calls; without n: one call per sample
        ("agree", 1, True, 1, 4),
        ("agree", 5, True, 1, 4),
        ("agree", 5, False, 5, 8),
        # the first round draws min_samples (4), then rounds of 3: 4 + 3 -> 2 calls
        ("odd", 3, True, 1, 2),
        ("odd", 3, False, 3, 7),
    ],
)
def test_upstream_calls(model: str, n: int, supports_n: bool, main: int, samples: int) -> None:
    calls = upstream_calls(n, supports_n, rule(model))
    assert (calls.main, calls.samples, calls.total) == (main, samples, main + samples)


def test_the_issues_worst_case_counts_192_calls() -> None:
    r = rule("agree", sampling=dataclasses.replace(rule("agree").sampling, samples=64))
    assert upstream_calls(128, False, r).total == 192


def test_n_above_max_n_names_n() -> None:
    assert check_request(16, True, rule()) is None
    refused = check_request(17, True, rule())
    assert refused is not None
    assert (refused.limit, refused.param) == ("max_n", "n")


def test_too_many_upstream_calls_is_refused_only_where_n_fans_out() -> None:
    r = rule("agree", max_upstream_calls=12)
    assert check_request(4, False, r) is None  # 4 + 8
    refused = check_request(5, False, r)  # 5 + 8
    assert refused is not None
    assert (refused.limit, refused.param) == ("max_upstream_calls", "n")
    assert "13" in refused.message
    assert check_request(5, True, r) is None  # 1 + 4


# --- the error ----------------------------------------------------------------------------


def test_rate_limited_is_an_openai_429_with_retry_after_rounded_up() -> None:
    exc = RateLimited("slow down", retry_after=0.2)
    assert exc.status == 429
    assert exc.body()["error"]["type"] == "rate_limit_error"
    assert exc.body()["error"]["code"] == "rate_limit_exceeded"
    assert exc.headers() == {"retry-after": "1"}
    assert RateLimited("x", retry_after=2.01).headers() == {"retry-after": str(math.ceil(2.01))}
    assert ProxyError("x").headers() == {}


# --- an admission the shared limiter is still deciding ------------------------------------


class _Lease:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def _admission(
    pending: asyncio.Future[Lease | Refusal],
) -> tuple[Admission, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Admission(metrics, "t", pending=pending), metrics


def _in_flight(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("abstain_in_flight_requests", {"tenant": "t"})


async def test_an_admission_ended_before_it_is_decided_gives_its_lease_back_then() -> None:
    pending: asyncio.Future[Lease | Refusal] = asyncio.get_running_loop().create_future()
    admission, metrics = _admission(pending)
    assert _in_flight(metrics) == 1
    admission.release()
    assert _in_flight(metrics) == 0
    lease = _Lease()
    pending.set_result(lease)
    await asyncio.sleep(0)  # the done-callback runs
    assert lease.released == 1
    admission.release()  # once only
    assert lease.released == 1 and _in_flight(metrics) == 0


async def test_a_refusal_while_answering_is_raised_by_confirmed_not_by_a_cancel() -> None:
    pending: asyncio.Future[Lease | Refusal] = asyncio.get_running_loop().create_future()
    admission, metrics = _admission(pending)
    refusal = Refusal("Rate limit exceeded.", "rate_limit_per_second", 2.0)
    asyncio.get_running_loop().call_soon(pending.set_result, refusal)
    with pytest.raises(RateLimited) as caught:
        await admission.confirmed()
    assert caught.value.retry_after == 2.0
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    counted = metrics.registry.get_sample_value(
        "abstain_limited_requests_total", {"tenant": "t", "limit": "rate_limit_per_second"}
    )
    assert counted == 1


async def test_a_refusal_before_the_answer_cancels_the_request() -> None:
    pending: asyncio.Future[Lease | Refusal] = asyncio.get_running_loop().create_future()

    async def request() -> str:
        admission, _ = _admission(pending)
        asyncio.get_running_loop().call_soon(
            pending.set_result, Refusal("Too many.", "max_concurrent_requests", 1.0)
        )
        try:
            await asyncio.sleep(60)  # the upstream call
        except asyncio.CancelledError:
            assert admission.refused_error() is not None
            return "cancelled"
        return "answered"

    assert await asyncio.wait_for(request(), 30) == "cancelled"


async def test_a_decided_lease_is_released_with_the_admission() -> None:
    pending: asyncio.Future[Lease | Refusal] = asyncio.get_running_loop().create_future()
    admission, _ = _admission(pending)
    lease = _Lease()
    pending.set_result(lease)
    await admission.confirmed()
    admission.release()
    assert lease.released == 1
