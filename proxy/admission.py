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
from typing import Any, TypeVar, cast

from starlette.requests import ClientDisconnect, Request

from proxy.errors import (
    BadRequest,
    ClientClosedRequest,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
)
from proxy.limits import Lease, Limiter, MemoryLimiter, Refusal, SharedLimiter, check_request
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
    # The ASGI messages read directly (as Request.stream() would, less its generator):
    # this is on every request's path, and nearly every body comes in one message.
    parts: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        part: bytes = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.")
        if not message.get("more_body", False):
            if not parts:
                return part
            parts.append(part)
            return b"".join(parts)
        parts.append(part)


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
) -> Admission:
    """Check the request's cost (400), then take a tenant lease (429).

    Cost first: a request that can never be admitted should not spend a rate token. A
    shared limiter (Redis) admits at once from a batch this process holds
    (:meth:`~proxy.limits.SharedLimiter.acquire_held`), else is awaited, within its
    deadline, unless it lets the request go on while it decides
    (:meth:`~proxy.limits.SharedLimiter.acquire_overlapped`); the in-memory one is not
    awaited at all.
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
    now = time.monotonic()
    if hasattr(limiter, "acquire_async"):  # a SharedLimiter (a Protocol check is slower)
        shared = cast(SharedLimiter, limiter)
        held = shared.acquire_held(tenant, rule, now)
        if held is not None:
            return Admission(metrics, tenant, lease=held)
        pending = shared.acquire_overlapped(tenant, rule, now)
        if pending is not None:
            return Admission(metrics, tenant, pending=pending)
        got: Lease | Refusal = await shared.acquire_async(tenant, rule, now)
    else:
        got = limiter.acquire(tenant, rule, now)
    if isinstance(got, Refusal):
        metrics.limited.labels(tenant, got.limit).inc()
        raise RateLimited(got.message, retry_after=got.retry_after)
    return Admission(metrics, tenant, lease=got)


class Admission:
    """An admitted request's hold on its tenant's limits: :meth:`release` it at the end.

    Usually decided at once (it holds a lease). Overlapped, the shared limiter is still
    deciding while the request goes on: a refusal then cancels the request's task (its
    upstream call with it; :func:`until_disconnect` answers 429), and :meth:`confirmed`,
    awaited before any byte goes to the client, raises the 429 itself when the refusal
    comes while the request is being answered.
    """

    def __init__(
        self,
        metrics: Metrics,
        tenant: str,
        *,
        lease: Lease | None = None,
        pending: asyncio.Future[Lease | Refusal] | None = None,
    ) -> None:
        self._metrics = metrics
        self._tenant = tenant
        self._lease = lease
        self._pending = pending
        self._released = False
        self._confirming = False
        #: whether the request's upstream work may have begun before the decision came
        self._work_began = True
        self._settled = False
        #: the refusal of an overlapped check, once it has come
        self.refusal: Refusal | None = None
        self._gauge = metrics.in_flight.labels(tenant)
        self._gauge.inc()
        if pending is not None:
            self._task = asyncio.current_task()
            pending.add_done_callback(self._decided)

    def _decided(self, pending: asyncio.Future[Lease | Refusal]) -> None:
        # Run by the future's callback, or first by confirmed(): whichever comes first.
        if self._settled or pending.cancelled() or pending.exception() is not None:
            return  # a failure is surfaced by confirmed()
        self._settled = True
        got = pending.result()
        if isinstance(got, Refusal):
            self.refusal = got
            self._metrics.limited.labels(self._tenant, got.limit).inc()
            if self._work_began:
                self._metrics.late_refusals.labels(self._tenant).inc()
            if not self._released and not self._confirming and self._task is not None:
                self._task.cancel()  # stop paying the upstream for a refused request
        elif self._released:
            got.release()  # the request ended before its admission was decided
        else:
            self._lease = got

    def refused_error(self) -> RateLimited | None:
        """The 429 for a refusal that has come, else None."""
        if self.refusal is None:
            return None
        return RateLimited(self.refusal.message, retry_after=self.refusal.retry_after)

    async def confirmed(self, *, before_work: bool = False) -> None:
        """Return once the admission is decided; 429 when the shared check refused.

        ``before_work``: awaited before any upstream call (a stream), so a refusal here
        cost nothing upstream and is not counted as a late one.
        """
        pending = self._pending
        if pending is not None:
            if not pending.done():
                self._work_began = not before_work
                self._confirming = True
                await asyncio.shield(pending)
            self._decided(pending)
        error = self.refused_error()
        if error is not None:
            raise error
        if pending is not None and not pending.cancelled():
            pending.result()  # a bug in the limiter is not an admission

    def release(self) -> None:
        """Give the hold back (once; an undecided one is given back when decided)."""
        if self._released:
            return
        self._released = True
        self._gauge.dec()
        if self._lease is not None:
            self._lease.release()


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


async def until_disconnect(
    request: Request, work: Awaitable[T], admission: Admission | None = None
) -> T:
    """``work``'s result, or 499 once the client has gone: the work is then cancelled,
    so an abandoned request stops paying for upstream calls (nginx closes the upstream
    too). The watch starts only when the work outlasts :data:`WATCH_AFTER_SECONDS`.

    An overlapped ``admission`` that is refused cancels the work too: 429."""
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
        refused = admission.refused_error() if admission is not None else None
        if refused is not None:
            task.uncancel()
            raise refused from None
        raise
    finally:
        timer.cancel()
        for w in watcher:
            w.cancel()
