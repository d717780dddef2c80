"""Admission: who is asking, whether they may, and whether they are still there.

Everything a request must pass before the pipeline runs, in the order that keeps a
hostile client cheap: the key is checked before the body is read (an unauthenticated
client declaring a 4 MB body at 1 byte/s holds nothing), the body has a size limit and
a deadline, the request's cost is checked against the tenant's limits (400), and a
tenant lease is taken (429). :func:`until_disconnect` then cancels the work when the
client goes away before its answer is ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request

from proxy.errors import (
    BadRequest,
    ClientClosedRequest,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
)
from proxy.limits import Lease, Limiter, MemoryLimiter, Refusal, check_request
from proxy.metrics import Metrics
from proxy.policy.loading import PolicyStore
from proxy.policy.rules import Policy, Route, Rule

T = TypeVar("T")


def api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("api-key")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        parts.append(part)
    return b"".join(parts)


def tenant_of(store: PolicyStore, request: Request) -> str:
    tenant = store.current.tenant_for(api_key(request))
    if tenant is None:
        raise Unauthorized("Invalid or missing API key.")
    return tenant


def limiter_of(request: Request) -> Limiter:
    """The app's limiter; an in-memory one is made on first use when none was installed."""
    state = request.app.state
    limiter: Limiter | None = getattr(state, "limiter", None)
    if limiter is None:
        limiter = state.limiter = MemoryLimiter()
    return limiter


async def admit(
    request: Request, policy: Policy, route: Route, rule: Rule, body: dict[str, Any]
) -> Callable[[], None]:
    """Check the request's cost (400), then take a tenant lease (429); returns its release.

    Cost first: a request that can never be admitted should not spend a rate token. A
    shared limiter (Redis) is awaited, within its deadline; the in-memory one is not.
    """
    metrics: Metrics = request.app.state.metrics
    tenant = rule.tenant
    upstream = policy.spec.upstreams.get(route.upstream)
    supports_n = upstream.supports_n if upstream is not None else True
    too_costly = check_request(body.get("n") or 1, supports_n, rule)
    if too_costly is not None:
        metrics.limited.labels(tenant, too_costly.limit).inc()
        raise BadRequest(too_costly.message, param=too_costly.param)
    limiter = limiter_of(request)
    acquire_async = getattr(limiter, "acquire_async", None)  # a SharedLimiter
    if acquire_async is not None:
        got: Lease | Refusal = await acquire_async(tenant, rule, time.monotonic())
    else:
        got = limiter.acquire(tenant, rule, time.monotonic())
    if isinstance(got, Refusal):
        metrics.limited.labels(tenant, got.limit).inc()
        raise RateLimited(got.message, retry_after=got.retry_after)
    gauge = metrics.in_flight.labels(tenant)
    gauge.inc()
    lease = got
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            lease.release()
            gauge.dec()

    return release


class ReleasingBody:
    """A stream body that calls ``release`` once: at its end, on an error, or on close.

    Starlette closes (or cancels) the body when the client goes away; a body dropped
    before it was ever iterated is released when collected, as a last resort.
    """

    def __init__(self, body: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> ReleasingBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._body)
        except BaseException:  # StopAsyncIteration included: the stream is over
            self._done()
            raise

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._done()

    def _done(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self._done()


async def read_body_in_time(request: Request, limit: int, seconds: float) -> bytes:
    """The body within ``seconds`` (408 past them), refused with 413 above ``limit``.

    A bare timer rather than ``asyncio.timeout()``: it is on every request's path, and
    a timer handle costs a fraction of a timeout scope.
    """
    task = asyncio.current_task()
    assert task is not None
    late: list[bool] = []

    def expire() -> None:
        late.append(True)
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await read_body(request, limit)
    except asyncio.CancelledError:
        if not late:
            raise
        task.uncancel()  # our own cancellation, answered with a 408
        raise RequestTimeout(f"The request body was not received within {seconds:g} s.") from None
    finally:
        timer.cancel()


#: Work shorter than this is not watched: a watcher costs a task per request, and a
#: client that leaves within it costs at most this much upstream time.
WATCH_AFTER_SECONDS = 0.25


async def _cancel_on_disconnect(
    request: Request, task: asyncio.Task[Any], gone: list[bool]
) -> None:
    # Once the body is read, the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.append(True)
    task.cancel()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or 499 once the client has gone: the work is then cancelled,
    so an abandoned request stops paying for upstream calls (nginx closes the upstream
    too). The watch starts only when the work outlasts :data:`WATCH_AFTER_SECONDS`."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone: list[bool] = []
    watcher: list[asyncio.Task[None]] = []

    def watch() -> None:
        watcher.append(loop.create_task(_cancel_on_disconnect(request, task, gone)))

    timer = loop.call_later(WATCH_AFTER_SECONDS, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            # Our own cancellation, now answered: the task must not stay marked cancelled.
            task.uncancel()
            raise ClientClosedRequest("The client closed the request.") from None
        raise
    finally:
        timer.cancel()
        for w in watcher:
            w.cancel()
