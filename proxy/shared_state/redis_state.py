"""The one Redis client the shared pieces go through: deadlines, back-off, counting.

Every call passes through :meth:`RedisState.run`, which bounds it by ``timeout``
seconds (``asyncio.timeout`` around the whole command, connecting included, plus the
socket timeouts), turns any failure into :class:`SharedStateUnavailable`, counts it in
``abstain_shared_state_errors_total{operation}`` and logs it at most once a minute.
After a failure Redis is not tried for ``retry_seconds`` (callers fall back at once,
and those skipped calls are counted too);
the first call after that tries again, and a success sets ``abstain_shared_state_up``
back to 1 and logs the recovery. redis-py's own retries are off: the deadline is ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from proxy.metrics import Metrics
from proxy.shared_state.memory import SharedStateUnavailable

log = logging.getLogger("abstain.shared_state")

T = TypeVar("T")

#: Seconds between two log lines about Redis failing.
_LOG_INTERVAL = 60.0
#: Queued background commands sent in one round trip at most.
_BATCH = 256

UNAVAILABLE = "The shared state store (Redis) is unavailable; try again shortly."


class RedisState:
    """A Redis client (made in the running loop by :meth:`start`) behind a deadline."""

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics,
        timeout: float = 0.05,
        retry_seconds: float = 1.0,
        prefix: str = "abstain:",
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self._url = url  # may hold a password: never logged
        self.metrics = metrics
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.prefix = prefix
        self._factory = client_factory or self._redis_client
        self.client: Any = None
        self._down_until = 0.0
        self._up = False
        self._last_logged = -_LOG_INTERVAL
        self._scripts: dict[str, Any] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: (operation, add the command to a pipeline, called if it could not be sent)
        self._queue: list[tuple[str, Callable[[Any], object], Callable[[], None] | None]] = []
        self._flushing = False

    def _redis_client(self) -> Any:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return redis.Redis.from_url(
            self._url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )

    async def start(self) -> None:
        """Make the client (no connection yet: the first call connects, under its deadline)."""
        self.client = self._factory()
        self.metrics.shared_state_up.set(0)

    async def settle(self) -> None:
        """Wait for the background writes and releases started so far (each has its deadline)."""
        while pending := [task for task in self._background if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Let background writes finish, then close the client."""
        await self.settle()
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    @property
    def available(self) -> bool:
        """False during the back-off after a failure."""
        return self.client is not None and time.monotonic() >= self._down_until

    def script(self, source: str) -> Any:
        """A registered Lua script (EVALSHA, loading it on NOSCRIPT), per client."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    async def run(
        self,
        operation: str,
        call: Callable[[Any], Awaitable[T]],
        *,
        during_backoff: bool = False,
        also: Sequence[str] = (),
        timeout: float | None = None,
    ) -> T:
        """``call(client)`` within the deadline, or :class:`SharedStateUnavailable`.

        ``during_backoff`` tries even while backing off (for work off the request path,
        such as releasing a concurrency slot, whose loss would hold the slot until its TTL).
        ``also`` names more operations the call carries, each counted when it fails.
        ``timeout`` replaces the deadline, for background reads whose reply is large (the
        labels a refit reads): never for a call a request waits on.
        """
        if self.client is None or (not during_backoff and time.monotonic() < self._down_until):
            # Not tried, but not done either: counted, so the counter shows what was affected.
            for name in (operation, *also):
                self.metrics.shared_state_errors.labels(name).inc()
            raise SharedStateUnavailable(UNAVAILABLE, retry_after=self.retry_seconds)
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                result = await call(self.client)
        except Exception as exc:  # RedisError, OSError, TimeoutError, a bad reply
            for name in also:
                self.metrics.shared_state_errors.labels(name).inc()
            self._failed(operation, exc)
            raise SharedStateUnavailable(UNAVAILABLE, retry_after=self.retry_seconds) from None
        if not self._up:
            self._up = True
            self.metrics.shared_state_up.set(1)
            if self._down_until:
                log.warning("shared state: Redis answers again; limits and feedback are shared")
        self._down_until = 0.0
        return result

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.metrics.shared_state_errors.labels(operation).inc()
        self._up = False
        self.metrics.shared_state_up.set(0)
        moment = time.monotonic()
        self._down_until = moment + self.retry_seconds
        if moment - self._last_logged >= _LOG_INTERVAL:
            self._last_logged = moment
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning(
                "shared state: Redis %s failed (%s: %s); limits are per pod and feedback "
                "answers 503 until Redis answers again (errors are counted in "
                "abstain_shared_state_errors_total)",
                operation,
                reason,
                str(exc)[:200],
            )

    def enqueue(
        self,
        operation: str,
        command: Callable[[Any], object],
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        """Send ``command(pipeline)`` in the background, with whatever else is queued by
        then: one ``MULTI``/``EXEC`` round trip for a request's writes (remembering the
        response, releasing its slot), and for many requests' under load."""
        self._queue.append((operation, command, on_failure))
        if not self._flushing:
            self._flushing = True
            self.background(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]

                async def send(client: Any, batch: Any = batch) -> None:
                    async with client.pipeline(transaction=True) as pipe:
                        for _, command, _ in batch:
                            command(pipe)
                        await pipe.execute()

                operations = [operation for operation, _, _ in batch]
                try:
                    await self.run(operations[0], send, during_backoff=True, also=operations[1:])
                except SharedStateUnavailable:
                    for _, _, on_failure in batch:
                        if on_failure is not None:
                            on_failure()
        finally:
            self._flushing = False

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` without awaiting it (kept referenced until done; errors swallowed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (an object collected at exit): nothing to run on
            work.close()
            return
        task = loop.create_task(_quietly(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(SharedStateUnavailable):
        await work
