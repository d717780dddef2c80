"""The HTTP exchange an OpenAI-compatible upstream rides on: one POST, then its body.

:class:`~proxy.upstream.openai_http.OpenAIHTTPUpstream` speaks the wire format; a
:class:`Wire` carries its bytes. An upstream asks its wire once for an
:class:`Endpoint` per URL (URL, headers and timeouts prepared then, not per request),
and each request is ``await endpoint.post(body)``: a :class:`WireResponse` whose body
is read as decoded chunks. Two wires carry them:

* :class:`AiohttpWire`, in service: aiohttp's connection pool, called directly. It was
  already the pool under httpx's API (``httpx-aiohttp``); the httpx request, headers
  and response objects made around every call cost a fifth of the proxy's CPU per
  request, and are gone (docs/performance.md has the before and after).
* :class:`HttpxWire`, over any ``httpx.AsyncBaseTransport``: what tests inject
  (``httpx.MockTransport``, an ASGI app) and the evaluation commands use.

Both fail the same way, so an upstream cannot tell them apart: a refused, reset or
broken connection is :class:`~proxy.errors.UpstreamUnreachable` (502), a connect or
read that outlasts its timeout :class:`~proxy.errors.UpstreamTimeout` (504), before
the status line or while the body is read. Neither keeps cookies: one wire serves
every tenant, and a cookie one upstream answer set must not ride along on the next
tenant's request. Neither follows redirects (a 3xx is the upstream's answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx
import yarl

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to connect (a pooled connection included) and between two reads."""

    connect: float
    read: float


class WireResponse(Protocol):
    """An upstream's answer: status and headers read, the body not yet."""

    @property
    def status(self) -> int: ...

    def header(self, name: str) -> str | None:
        """A response header (case-insensitive), or None."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body, decompressed, in the pieces it arrives in."""
        ...

    async def aclose(self) -> None:
        """Release the connection (back to the pool when the body was read)."""
        ...


class Endpoint(Protocol):
    """One URL with its headers and timeouts, ready to take request bodies."""

    async def post(self, content: bytes) -> WireResponse: ...


class Wire(Protocol):
    """A connection pool that prepares endpoints and is closed with the process."""

    def endpoint(self, url: str, headers: Mapping[str, str], timeouts: Timeouts) -> Endpoint: ...

    async def aclose(self) -> None: ...


# --- aiohttp, in service -------------------------------------------------------------


def _aiohttp_error(exc: BaseException) -> UpstreamError:
    # aiohttp's connect and read timeouts are TimeoutError subclasses.
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout()
    return UpstreamUnreachable()


class _AiohttpResponse:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _aiohttp_error(exc) from None

    async def aclose(self) -> None:
        # Read to the end: back to the pool. Not read to the end (an error, a cap): the
        # connection is closed, so the rest of that answer never reaches another request.
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class _AiohttpEndpoint:
    __slots__ = ("_headers", "_session", "_timeout", "_url")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: Mapping[str, str],
        timeouts: Timeouts,
    ) -> None:
        self._session = session
        self._url = yarl.URL(url)
        self._headers = dict(headers)
        # ``total`` is left to the upstream: its deadline spans the whole answer.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=timeouts.connect, sock_connect=timeouts.connect,
            sock_read=timeouts.read,
        )  # fmt: skip

    async def post(self, content: bytes) -> WireResponse:
        try:
            response = await self._session.post(
                self._url,
                data=content,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _aiohttp_error(exc) from None
        return _AiohttpResponse(response)


class AiohttpWire:
    """aiohttp's pool: at most ``max_connections`` open, no cookie kept, made on first use
    (an aiohttp session belongs to the running loop)."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                # Only what the upstream sets: no aiohttp user agent, no guessed type.
                skip_auto_headers=("User-Agent", "Content-Type"),
            )
        return self._session

    def endpoint(self, url: str, headers: Mapping[str, str], timeouts: Timeouts) -> Endpoint:
        return _LazyEndpoint(self, url, headers, timeouts)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _LazyEndpoint:
    """An aiohttp endpoint made on the first request, inside the loop that serves it.

    Upstreams are built when the policy loads, which may be before the loop runs.
    """

    __slots__ = ("_args", "_endpoint", "_wire")

    def __init__(
        self, wire: AiohttpWire, url: str, headers: Mapping[str, str], timeouts: Timeouts
    ) -> None:
        self._wire = wire
        self._args = (url, dict(headers), timeouts)
        self._endpoint: _AiohttpEndpoint | None = None

    async def post(self, content: bytes) -> WireResponse:
        endpoint = self._endpoint
        if endpoint is None:
            endpoint = self._endpoint = _AiohttpEndpoint(self._wire._session_now(), *self._args)
        return await endpoint.post(content)


# --- httpx, for injected transports --------------------------------------------------


def _httpx_error(exc: httpx.TransportError) -> UpstreamError:
    # Some transports (httpx-aiohttp) report a refused connection as ConnectTimeout:
    # look at the cause, so that a dead upstream is a 502 and only a slow one a 504.
    cause = exc.__cause__
    is_timeout = isinstance(exc, httpx.TimeoutException) and (
        cause is None or isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__
    )
    return UpstreamTimeout() if is_timeout else UpstreamUnreachable()


class _HttpxResponse:
    __slots__ = ("_response",)

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status_code

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class _HttpxEndpoint:
    __slots__ = ("_extensions", "_headers", "_transport", "_url")

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        url: str,
        headers: Mapping[str, str],
        timeouts: Timeouts,
    ) -> None:
        self._transport = transport
        self._url = httpx.URL(url)
        self._headers = httpx.Headers(dict(headers))
        timeout = httpx.Timeout(
            connect=timeouts.connect, read=timeouts.read, write=timeouts.read,
            pool=timeouts.connect,
        )  # fmt: skip
        self._extensions = {"timeout": timeout.as_dict()}

    async def post(self, content: bytes) -> WireResponse:
        # The transport itself, not httpx.AsyncClient: no cookie jar, no redirects.
        request = httpx.Request(
            "POST", self._url, content=content, headers=self._headers,
            extensions=self._extensions,
        )  # fmt: skip
        try:
            response = await self._transport.handle_async_request(request)
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from None
        response.request = request
        return _HttpxResponse(response)


class HttpxWire:
    """Any httpx transport as a wire (closing the wire closes the transport)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    def endpoint(self, url: str, headers: Mapping[str, str], timeouts: Timeouts) -> Endpoint:
        return _HttpxEndpoint(self.transport, url, headers, timeouts)

    async def aclose(self) -> None:
        await self.transport.aclose()
