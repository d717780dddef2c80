"""The FastAPI application factory.

``create_app`` loads the policy (so a broken one fails before anything listens), and
its lifespan builds what needs a running loop: the shared HTTP transport, the upstreams,
the reload watcher. Nothing happens at import time; every collaborator can be injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.decision_log import DecisionLog
from proxy.errors import BadRequest, MethodNotAllowed, NotFound, ProxyError
from proxy.feedback_risk import FeedbackRisk
from proxy.metrics import Metrics
from proxy.online_recalibration import OnlineRecalibration
from proxy.pipeline import Pipeline
from proxy.policy.loading import PolicyStore
from proxy.recalibration_store import store_for as recalibration_store
from proxy.recording import Recorder
from proxy.routes import LANES, routes
from proxy.settings import Settings, environment
from proxy.shared_state.memory import FeedbackMemory
from proxy.upstream.base import ResponseCaps
from proxy.upstream.pool import UpstreamPool
from proxy.upstream.wire import AiohttpWire, HttpxWire, Wire

if TYPE_CHECKING:
    from proxy.shared_state.redis_limiter import RedisLimiter
    from proxy.shared_state.redis_recalibration import RedisRecalibrationStore
    from proxy.shared_state.redis_state import RedisState

log = logging.getLogger("abstain")


def _telemetry(on: bool) -> TelemetryConfig:
    # Off: all three switches false, so FastAPI skips its per-request provider lookup.
    return {"tracing": on, "metrics": on, "logs": on}


def _wire(settings: Settings, transport: httpx.AsyncBaseTransport | None) -> Wire:
    """An injected httpx transport (tests, in-process evaluation), else aiohttp's pool:
    ~3.5x the throughput of httpx's default pool under concurrency, and without httpx's
    objects per request a fifth less CPU again (docs/performance.md)."""
    if transport is not None:
        return HttpxWire(transport)
    return AiohttpWire(settings.max_upstream_connections)


async def _watch_step(store: PolicyStore) -> None:
    """One poll of the policy file: reload (parsed off the loop) if it changed.

    Never raises: a failed reload is already logged and counted by the store, and
    anything else is logged here, so the watcher outlives every broken edit.
    """
    try:
        if store.changed():
            await store.reload_async()
    except Exception:
        log.exception("policy watcher: unexpected error; still watching %s", store.path)


async def _watch(store: PolicyStore, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await _watch_step(store)


def create_app(
    settings: Settings | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    registry: CollectorRegistry | None = None,
    env: Mapping[str, str] | None = None,
) -> FastAPI:
    """Build the proxy. Raises :class:`~proxy.policy.loading.PolicyError` on a broken policy."""
    settings = settings or Settings()
    metrics = Metrics(registry)
    env = environment() if env is None else env

    def on_reload(result: str) -> None:
        metrics.policy_reloads.labels(result).inc()
        metrics.policy_loaded.set(1 if result == "success" else 0)
        if result == "success" and upstreams is not None:
            upstreams.rebuild(store.current.spec.upstreams)

    upstreams: UpstreamPool | None = None
    store = PolicyStore(settings.policy, on_reload=on_reload)
    metrics.policy_loaded.set(1)
    shared, feedback_memory, limiter = _shared_state(settings, metrics)
    decisions = DecisionLog(
        settings.decision_log,
        memory=settings.feedback_memory,
        on_error=metrics.decision_log_errors.inc,  # called with the records lost
        feedback_memory=feedback_memory,
    )
    recorder = Recorder(metrics, decisions)
    recalibration = OnlineRecalibration(
        recalibration_store(settings, _redis_recalibration(settings, shared)),
        metrics,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal upstreams
        if shared is not None:
            await shared.start()  # the Redis client belongs to this loop
            await recalibration.start()  # the shared maps, loaded before the first request
        wire = _wire(settings, transport)
        caps = ResponseCaps(
            max_response_bytes=settings.max_upstream_response_bytes,
            max_line_bytes=settings.max_upstream_line_bytes,
        )
        upstreams = UpstreamPool(wire, env, metrics, caps)
        upstreams.rebuild(store.current.spec.upstreams)
        app.state.upstreams = upstreams
        app.state.pipeline = Pipeline(
            upstreams,
            recorder,
            recalibration=recalibration,
            feedback_risk=FeedbackRisk(recalibration.store),
        )
        loop = asyncio.get_running_loop()
        watcher = None
        if settings.reload_interval_seconds > 0:
            watcher = asyncio.create_task(_watch(store, settings.reload_interval_seconds))
        sighup_reloads: set[asyncio.Task[bool]] = set()

        def on_sighup() -> None:
            # Parse in a worker thread, like the watcher; keep a reference to the task.
            task = loop.create_task(store.reload_async())
            sighup_reloads.add(task)
            task.add_done_callback(sighup_reloads.discard)

        if settings.handle_signals:
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            if settings.handle_signals:
                loop.remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                watcher.cancel()
            for task in list(sighup_reloads):
                task.cancel()
            await wire.aclose()
            await recalibration.aclose()
            if limiter is not None:
                await limiter.hand_back_all()  # batches of shared limits, before the last writes
            if shared is not None:
                await shared.close()
            decisions.close()

    app = ProxyApp(
        title="abstain-proxy",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # No 307 to a Location built from the client's Host header for a trailing slash.
        redirect_slashes=False,
        telemetry=_telemetry(settings.opentelemetry),
    )
    if settings.opentelemetry:
        app.lanes = {}
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.store = store
    app.state.decisions = decisions
    if limiter is not None:
        app.state.limiter = limiter
    app.state.shared_state = shared
    app.state.recorder = recorder
    app.state.recalibration = recalibration
    app.router.routes.extend(routes)
    app.add_exception_handler(ProxyError, _proxy_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


class ProxyApp(FastAPI):
    """The FastAPI app, with the completion endpoints served ahead of its middleware.

    ``POST /v1/chat/completions`` and ``POST /v1/completions`` carry nearly all of the
    traffic, take the raw request and answer every failure with their own
    :class:`~proxy.errors.ProxyError`. The eight layers a request otherwise passes
    (server-error, telemetry, body-limit, exception and exit-stack middleware, router,
    route, request wrapper) and the wrapped ``send`` of each cost a tenth of the proxy's
    CPU per request and did nothing for them (docs/performance.md). Everything else,
    and any other method on those paths, goes through FastAPI as usual; so does every
    request when FastAPI's OpenTelemetry is on (``lanes`` empty), so that it traces them.
    """

    #: path -> endpoint of the requests served ahead of the middleware (POST only)
    lanes: Mapping[str, Any] = LANES

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.lanes.get(scope["path"])
            if endpoint is not None:
                await self._lane(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _lane(self, endpoint: Any, scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = self  # what Starlette sets: request.app, and its state, for handlers
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except ProxyError as exc:
            response = await _proxy_error(request, exc)
        except Exception as exc:
            # As Starlette's server-error middleware: a 500 in OpenAI's shape, then the
            # error goes on to the server, which logs it.
            await (await _internal_error(request, exc))(scope, receive, send)
            raise
        await response(scope, receive, send)


def _shared_state(
    settings: Settings, metrics: Metrics
) -> tuple[RedisState | None, FeedbackMemory | None, RedisLimiter | None]:
    """With ``ABSTAIN_REDIS_URL``: the Redis client, feedback memory and limiter every pod
    shares. Without: nothing (the in-memory defaults), and Redis is not even imported."""
    if settings.redis_url is None:
        return None, None, None
    from proxy.shared_state.redis_limiter import RedisLimiter
    from proxy.shared_state.redis_memory import RedisFeedbackMemory
    from proxy.shared_state.redis_state import RedisState

    shared = RedisState(
        settings.redis_url.get_secret_value(),
        metrics=metrics,
        timeout=settings.redis_timeout_seconds,
        retry_seconds=settings.redis_retry_seconds,
        prefix=settings.redis_key_prefix,
    )
    memory = RedisFeedbackMemory(shared, ttl_seconds=settings.feedback_ttl_seconds)
    return shared, memory, RedisLimiter(shared, lease_seconds=settings.redis_lease_seconds)


def _redis_recalibration(
    settings: Settings, shared: RedisState | None
) -> RedisRecalibrationStore | None:
    """With Redis: the recalibration store every pod shares (labels, the map in service)."""
    if shared is None:
        return None
    from proxy.shared_state.redis_recalibration import RedisRecalibrationStore

    return RedisRecalibrationStore(shared, max_labels=settings.redis_recalibration_labels)


async def _proxy_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405, in OpenAI's error shape like every other error."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        error: ProxyError = NotFound("No such endpoint.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on this endpoint.")
    else:
        error = ProxyError(str(exc.detail)[:200])
        error.status = exc.status_code
    return JSONResponse(error.body(), status_code=error.status, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    return JSONResponse(BadRequest(f"Invalid request: {exc}").body(), status_code=400)


async def _internal_error(_request: Request, exc: Exception) -> Response:
    # The traceback goes to the server log (via Starlette); the client sees no internals.
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(ProxyError("Internal error in the proxy.").body(), status_code=500)
