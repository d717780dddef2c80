"""Retries, backoff and the circuit breaker, on a fake clock against a scripted upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
    upstream_status_error,
)
from proxy.policy.schema import CircuitBreaker, Retries, UpstreamConfig
from proxy.protocol import Kind
from proxy.upstream.resilience import ResilientUpstream

OK = {"id": "ok", "choices": []}
Step = dict[str, Any] | Exception


def status(code: int, retry_after: float | None = None) -> UpstreamError:
    exc = upstream_status_error(code, "x")
    exc.retry_after = retry_after
    return exc


class Clock:
    """A fake monotonic clock; ``sleep`` advances it and records the wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Scripted:
    """An upstream that plays one script per call: an answer or an error, in order.

    For ``stream`` a script is a list of chunks and errors, played until the first error.
    """

    name = "scripted"
    supports_n = True

    def __init__(self, *scripts: Any) -> None:
        self.scripts = list(scripts)
        self.calls = 0

    def _next(self) -> Any:
        self.calls += 1
        return self.scripts.pop(0)

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        step = self._next()
        if isinstance(step, Exception):
            raise step
        return dict(step)

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for step in self._next():
            if isinstance(step, Exception):
                raise step
            yield step


def config(
    retries: int = 2,
    base: float = 0.25,
    cap: float = 2.0,
    threshold: int = 5,
    cooldown: float = 30.0,
    total: float = 300.0,
) -> UpstreamConfig:
    return UpstreamConfig.model_validate(
        {
            "base_url": "http://upstream.test/v1",
            "timeouts": {"total": total},
            "retries": {
                "max_retries": retries,
                "backoff_base_seconds": base,
                "backoff_max_seconds": cap,
            },
            "circuit_breaker": {"failure_threshold": threshold, "cooldown_seconds": cooldown},
        }
    )


def wrap(
    inner: Scripted, clock: Clock, rng: float = 0.999, **kwargs: Any
) -> tuple[ResilientUpstream, list[tuple[str, str]], list[str]]:
    retries: list[tuple[str, str]] = []
    states: list[str] = []
    up = ResilientUpstream(
        inner,
        config(**kwargs),
        clock=clock,
        sleep=clock.sleep,
        rng=lambda: rng,
        on_retry=lambda name, reason: retries.append((name, reason)),
        on_state=lambda name, state: states.append(state),
    )
    return up, retries, states


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def collect(up: ResilientUpstream) -> list[dict[str, Any]]:
    return [chunk async for chunk in up.stream("chat", {})]


# --- retries ---------------------------------------------------------------------------


def test_two_503s_then_success_is_three_calls_and_two_bounded_backoffs() -> None:
    clock = Clock()
    inner = Scripted(status(503), status(503), OK)
    up, retries, _ = wrap(inner, clock, rng=0.999)
    assert run(up.complete("chat", {})) == OK
    assert inner.calls == 3
    assert len(clock.sleeps) == 2
    # full jitter: uniform in [0, min(cap, base * 2**k)]
    assert 0 <= clock.sleeps[0] <= 0.25
    assert 0 <= clock.sleeps[1] <= 0.5
    assert clock.sleeps[1] > 0.25  # the window doubled
    assert retries == [("scripted", "status_503"), ("scripted", "status_503")]


def test_backoff_is_capped_and_jittered() -> None:
    clock = Clock()
    inner = Scripted(*[UpstreamUnreachable()] * 5, OK)
    up, _, _ = wrap(inner, clock, rng=1.0, retries=5, base=0.5, cap=1.5, threshold=0)
    assert run(up.complete("chat", {})) == OK
    assert clock.sleeps == [0.5, 1.0, 1.5, 1.5, 1.5]

    low = Clock()
    up, _, _ = wrap(Scripted(UpstreamUnreachable(), OK), low, rng=0.0)
    run(up.complete("chat", {}))
    assert low.sleeps == [0.0]


@pytest.mark.parametrize("exc", [UpstreamUnreachable(), status(502), status(504), status(429)])
def test_transient_failures_are_retried(exc: UpstreamError) -> None:
    inner = Scripted(exc, OK)
    up, retries, _ = wrap(inner, Clock())
    assert run(up.complete("chat", {})) == OK
    assert inner.calls == 2
    assert retries == [("scripted", exc.kind)]


@pytest.mark.parametrize(
    "exc",
    [
        status(400),
        status(422),
        status(500),
        UpstreamMalformed("not json"),
        UpstreamTimeout(),
        UpstreamError("mid-stream", kind="stream_error"),
    ],
)
def test_permanent_failures_are_not_retried(exc: UpstreamError) -> None:
    clock = Clock()
    inner = Scripted(exc, OK)
    up, retries, _ = wrap(inner, clock)
    with pytest.raises(type(exc)) as info:
        run(up.complete("chat", {}))
    assert info.value is exc
    assert inner.calls == 1
    assert clock.sleeps == [] and retries == []


def test_retry_after_is_honoured() -> None:
    clock = Clock()
    inner = Scripted(status(429, retry_after=7.0), OK)
    up, _, _ = wrap(inner, clock)
    assert run(up.complete("chat", {})) == OK
    assert clock.sleeps == [7.0]


def test_no_retry_whose_wait_would_pass_the_deadline() -> None:
    clock = Clock()
    first = status(503, retry_after=20.0)
    inner = Scripted(first, OK)
    up, retries, _ = wrap(inner, clock, total=10.0)
    with pytest.raises(UpstreamError) as info:
        run(up.complete("chat", {}))
    assert info.value is first
    assert inner.calls == 1 and clock.sleeps == [] and retries == []


def test_exhausted_retries_raise_the_last_error() -> None:
    clock = Clock()
    errors = [status(503), UpstreamUnreachable(), status(502)]
    inner = Scripted(*errors, OK)
    up, _, _ = wrap(inner, clock)
    with pytest.raises(UpstreamError) as info:
        run(up.complete("chat", {}))
    assert info.value is errors[-1]
    assert inner.calls == 3 and len(clock.sleeps) == 2


def test_zero_retries_is_one_attempt() -> None:
    inner = Scripted(status(503), OK)
    up, _, _ = wrap(inner, Clock(), retries=0)
    with pytest.raises(UpstreamError):
        run(up.complete("chat", {}))
    assert inner.calls == 1


def test_a_stream_is_retried_before_its_first_chunk() -> None:
    clock = Clock()
    inner = Scripted([status(503)], [UpstreamUnreachable()], [{"c": 1}, {"c": 2}])
    up, retries, _ = wrap(inner, clock)
    assert run(collect(up)) == [{"c": 1}, {"c": 2}]
    assert inner.calls == 3 and len(clock.sleeps) == 2
    assert [reason for _, reason in retries] == ["status_503", "connect"]


def test_a_stream_is_never_retried_after_a_chunk() -> None:
    clock = Clock()
    reset = UpstreamUnreachable()
    inner = Scripted([{"c": 1}, reset], [{"c": 1}, {"c": 2}])
    up, retries, _ = wrap(inner, clock)
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        async for chunk in up.stream("chat", {}):
            got.append(chunk)

    with pytest.raises(UpstreamUnreachable) as info:
        run(consume())
    assert info.value is reset
    assert got == [{"c": 1}]
    assert inner.calls == 1 and clock.sleeps == [] and retries == []


# --- circuit breaker -------------------------------------------------------------------


def test_breaker_opens_after_n_failures_and_fails_fast_with_503() -> None:
    clock = Clock()
    inner = Scripted(*[status(500)] * 3, OK)
    up, _, states = wrap(inner, clock, threshold=3, cooldown=30.0)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            run(up.complete("chat", {}))
    assert states == ["open"]
    clock.now += 10.0
    with pytest.raises(UpstreamUnavailable) as info:
        run(up.complete("chat", {}))
    assert inner.calls == 3  # failed fast: the upstream was not called
    err = info.value
    assert err.status == 503 and err.code == "upstream_unavailable" and err.kind == "circuit_open"
    assert err.retry_after == pytest.approx(20.0)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_retried_attempts_count_towards_the_breaker() -> None:
    clock = Clock()
    inner = Scripted(*[status(503)] * 3)
    up, retries, states = wrap(inner, clock, threshold=2)
    with pytest.raises(UpstreamError) as info:
        run(up.complete("chat", {}))
    # two failures opened it: the last error is raised, and no third attempt is made
    assert info.value.kind == "status_503"
    assert inner.calls == 2 and len(retries) == 1
    assert states == ["open"]


def test_half_open_probe_success_closes_the_breaker() -> None:
    clock = Clock()
    inner = Scripted(status(500), status(500), OK, OK)
    up, _, states = wrap(inner, clock, threshold=2, cooldown=30.0)
    for _ in range(2):
        with pytest.raises(UpstreamError):
            run(up.complete("chat", {}))
    clock.now += 30.0
    assert run(up.complete("chat", {})) == OK
    assert states == ["open", "half_open", "closed"]
    assert run(up.complete("chat", {})) == OK


def test_half_open_probe_failure_reopens_the_breaker() -> None:
    clock = Clock()
    inner = Scripted(status(500), status(500), status(503), OK)
    up, _, states = wrap(inner, clock, threshold=2, cooldown=30.0)
    for _ in range(2):
        with pytest.raises(UpstreamError):
            run(up.complete("chat", {}))
    clock.now += 31.0
    with pytest.raises(UpstreamError) as info:
        run(up.complete("chat", {}))
    assert info.value.kind == "status_503"  # the probe's own error, not retried
    assert inner.calls == 3
    assert states == ["open", "half_open", "open"]
    with pytest.raises(UpstreamUnavailable) as again:
        run(up.complete("chat", {}))
    assert again.value.retry_after == pytest.approx(30.0)


def test_only_one_probe_at_a_time() -> None:
    clock = Clock()
    release = asyncio.Event()

    class Slow(Scripted):
        async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
            step = self._next()
            if isinstance(step, Exception):
                raise step
            await release.wait()
            return dict(step)

    inner = Slow(status(500), OK, OK)
    up, _, _ = wrap(inner, clock, threshold=1, cooldown=5.0)

    async def scenario() -> None:
        with pytest.raises(UpstreamError):
            await up.complete("chat", {})
        clock.now += 5.0
        probe = asyncio.create_task(up.complete("chat", {}))
        await asyncio.sleep(0)
        with pytest.raises(UpstreamUnavailable):
            await up.complete("chat", {})
        release.set()
        assert await probe == OK
        assert await up.complete("chat", {}) == OK

    run(scenario())
    assert inner.calls == 3


@pytest.mark.parametrize("exc", [status(400), status(422), status(429)])
def test_client_errors_and_rate_limits_do_not_count(exc: UpstreamError) -> None:
    clock = Clock()
    inner = Scripted(*[exc] * 5, OK)
    up, _, states = wrap(inner, clock, threshold=2, retries=0)
    for _ in range(5):
        with pytest.raises(type(exc)):
            run(up.complete("chat", {}))
    assert run(up.complete("chat", {})) == OK
    assert states == []


def test_a_success_resets_the_count() -> None:
    clock = Clock()
    inner = Scripted(status(500), OK, status(500), OK)
    up, _, states = wrap(inner, clock, threshold=2)
    for outcome in (UpstreamError, OK, UpstreamError, OK):
        if outcome is OK:
            assert run(up.complete("chat", {})) == OK
        else:
            with pytest.raises(UpstreamError):
                run(up.complete("chat", {}))
    assert states == []


def test_threshold_zero_disables_the_breaker() -> None:
    inner = Scripted(*[status(500)] * 20)
    up, _, states = wrap(inner, Clock(), threshold=0)
    for _ in range(20):
        with pytest.raises(UpstreamError):
            run(up.complete("chat", {}))
    assert inner.calls == 20 and states == []


def test_a_stream_failing_midway_counts_as_a_failure() -> None:
    clock = Clock()
    inner = Scripted([{"c": 1}, UpstreamUnreachable()], [])
    up, _, states = wrap(inner, clock, threshold=1)
    with pytest.raises(UpstreamUnreachable):
        run(collect(up))
    assert states == ["open"]
    with pytest.raises(UpstreamUnavailable):
        run(collect(up))


# --- the policy ------------------------------------------------------------------------


def test_defaults() -> None:
    c = UpstreamConfig(base_url="http://x.test/v1")
    assert c.retries == Retries(max_retries=2, backoff_base_seconds=0.25, backoff_max_seconds=2.0)
    assert c.circuit_breaker == CircuitBreaker(failure_threshold=5, cooldown_seconds=30.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"retries": {"max_retries": -1}},
        {"retries": {"max_retries": 11}},
        {"retries": {"backoff_base_seconds": 0}},
        {"retries": {"backoff_base_seconds": 3, "backoff_max_seconds": 2}},
        {"retries": {"jitter": "none"}},
        {"circuit_breaker": {"failure_threshold": -1}},
        {"circuit_breaker": {"cooldown_seconds": -1}},
    ],
)
def test_invalid_settings_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        UpstreamConfig.model_validate({"base_url": "http://x.test/v1", **bad})


def test_the_error_classes_the_wrapper_relies_on() -> None:
    assert isinstance(status(400), UpstreamRejected)
    assert isinstance(status(429), UpstreamRateLimited)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("3", 3.0), ("0.5", 0.5), ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-1", None), (None, None)],
)
def test_retry_after_is_read_from_the_response(header: str | None, expected: float | None) -> None:
    from proxy.upstream.openai_http import _status_error

    exc = _status_error(503, b'{"error": {"message": "busy"}}', header)
    assert exc.retry_after == expected
    assert exc.upstream_status == 503
