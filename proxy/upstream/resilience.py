"""Retries with backoff and a circuit breaker, wrapped around any :class:`Upstream`.

:class:`ResilientUpstream` speaks the same protocol as the upstream it wraps:

* **Retries** of transient failures only: no connection (or a reset before any byte),
  429, and 502/503/504. Never a rejected request (400/422), a malformed answer, a
  timeout of the whole request, nor anything once a stream chunk has been handed on:
  a byte that reached the client cannot be taken back. The wait is the upstream's
  ``Retry-After`` when it sent one, else exponential backoff with full jitter; no retry
  starts unless its wait ends before the request's deadline (``timeouts.total``).
* **A circuit breaker** per upstream: after ``failure_threshold`` consecutive failed
  attempts it opens, and calls fail fast with :class:`~proxy.errors.UpstreamUnavailable`
  (503) for ``cooldown_seconds``; then one probe call goes through (half-open): success
  closes it, failure opens it again. A rejected request (the client's fault) and a 429
  (a quota, not an outage) count neither way.

Clock, sleep and randomness are injected so tests run on a fake clock, and metrics are
reported through two callbacks, so this module knows nothing of Prometheus.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from proxy.errors import (
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from proxy.policy.schema import CircuitBreaker as BreakerConfig
from proxy.policy.schema import UpstreamConfig
from proxy.protocol import Kind
from proxy.upstream.base import Upstream

State = Literal["closed", "half_open", "open"]
#: the gauge values of :data:`State`
STATE_VALUES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}
#: upstream statuses worth another attempt (with 429, a rate limit)
RETRY_STATUSES = frozenset({502, 503, 504})

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OnRetry = Callable[[str, str], None]  # (upstream, reason)
OnState = Callable[[str, State], None]  # (upstream, new state)


def retryable(exc: UpstreamError) -> bool:
    """Whether another attempt may succeed where this one failed."""
    if isinstance(exc, UpstreamUnavailable | UpstreamTimeout):
        return False
    if isinstance(exc, UpstreamUnreachable | UpstreamRateLimited):
        return True
    return exc.upstream_status in RETRY_STATUSES


def counts_as_failure(exc: UpstreamError) -> bool:
    """Whether the error speaks against the upstream's health (for the breaker)."""
    return exc.upstream_fault and not isinstance(exc, UpstreamRateLimited | UpstreamUnavailable)


def _ignore_state(_name: str, _state: State) -> None:
    pass


class Breaker:
    """One upstream's circuit breaker. Single event loop: no locks needed."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        clock: Clock = time.monotonic,
        on_state: OnState = _ignore_state,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_state = on_state
        self.state: State = "closed"
        self.failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def enabled(self) -> bool:
        return self.config.failure_threshold > 0

    def admit(self) -> bool:
        """Let a call through (returns whether it is the half-open probe) or raise 503."""
        if self.state == "open":
            remaining = self._open_until - self._clock()
            if remaining > 0:
                raise UpstreamUnavailable(retry_after=remaining)
            self._set("half_open")
        if self.state == "half_open":
            if self._probing:
                raise UpstreamUnavailable()
            self._probing = True
            return True
        return False

    def success(self, probe: bool) -> None:
        if probe:
            self._probing = False
            self._set("closed")
        if self.state == "closed":
            self.failures = 0

    def failure(self, probe: bool) -> None:
        if probe:
            self._probing = False
            self._open()
        elif self.state == "closed" and self.enabled:
            self.failures += 1
            if self.failures >= self.config.failure_threshold:
                self._open()

    def release(self, probe: bool) -> None:
        """The call ended without a verdict (cancelled, or not the upstream's fault)."""
        if probe:
            self._probing = False

    def _open(self) -> None:
        self.failures = 0
        self._open_until = self._clock() + self.config.cooldown_seconds
        self._set("open")

    def _set(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self._on_state(self.name, state)


class ResilientUpstream:
    """An :class:`Upstream` with bounded retries and a circuit breaker in front of it."""

    def __init__(
        self,
        inner: Upstream,
        config: UpstreamConfig,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        on_retry: OnRetry | None = None,
        on_state: OnState | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.inner = inner
        self.config = config
        self.name = inner.name
        self.supports_n = inner.supports_n
        self._retries = config.retries
        self._total = config.timeouts.total
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._on_retry = on_retry
        self.breaker = breaker or Breaker(
            inner.name,
            config.circuit_breaker,
            clock=clock,
            on_state=on_state or _ignore_state,
        )

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        deadline = self._clock() + self._total
        attempt, last = 0, None
        while True:
            probe = self._admit(last)
            try:
                if attempt == 0:
                    result = await self.inner.complete(kind, body)
                else:
                    # A retry may not outlive the request's deadline (the first attempt
                    # is bounded by the upstream's own total timeout).
                    async with asyncio.timeout(max(0.0, deadline - self._clock())):
                        result = await self.inner.complete(kind, body)
            except TimeoutError:
                self.breaker.failure(probe)
                raise UpstreamTimeout() from None
            except UpstreamError as exc:
                self._failed(exc, probe)
                await self._before_retry(exc, attempt, deadline)
                attempt, last = attempt + 1, exc
                continue
            except BaseException:
                self.breaker.release(probe)
                raise
            self.breaker.success(probe)
            return result

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        deadline = self._clock() + self._total
        attempt, last = 0, None
        while True:
            probe = self._admit(last)
            chunks = self.inner.stream(kind, body)
            sent = False
            try:
                async for chunk in chunks:
                    sent = True
                    yield chunk
            except UpstreamError as exc:
                self._failed(exc, probe)
                if sent:
                    raise
                await self._before_retry(exc, attempt, deadline)
                attempt, last = attempt + 1, exc
                continue
            except BaseException:
                # Closed early (client gone, or the consumer had enough) or cancelled:
                # chunks that arrived speak for the upstream; none is no verdict.
                if sent:
                    self.breaker.success(probe)
                else:
                    self.breaker.release(probe)
                raise
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
            self.breaker.success(probe)
            return

    def _admit(self, last: UpstreamError | None) -> bool:
        """Ask the breaker: a first attempt fails fast with 503, a retry with its last error.

        (Another call may have opened the breaker while this one was backing off.)
        """
        try:
            return self.breaker.admit()
        except UpstreamUnavailable:
            if last is None:
                raise
            raise last from None

    def _failed(self, exc: UpstreamError, probe: bool) -> None:
        if counts_as_failure(exc):
            self.breaker.failure(probe)
        elif probe:
            # Not the upstream's fault (400, 429): it answered, so it is up.
            self.breaker.success(probe)

    async def _before_retry(self, exc: UpstreamError, attempt: int, deadline: float) -> None:
        """Wait before the next attempt, or re-raise ``exc`` when there is none."""
        if attempt >= self._retries.max_retries or not retryable(exc):
            raise exc
        if self.breaker.state != "closed":
            raise exc  # the breaker opened on this failure: no point in another attempt
        if exc.retry_after is not None:
            delay = exc.retry_after
        else:
            r = self._retries
            cap = min(r.backoff_max_seconds, r.backoff_base_seconds * 2**attempt)
            delay = self._rng() * cap
        if self._clock() + delay >= deadline:
            raise exc
        if self._on_retry is not None:
            self._on_retry(self.name, exc.kind)
        await self._sleep(delay)
