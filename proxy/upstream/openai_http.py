"""An OpenAI-compatible upstream over the process's shared httpx transport.

Requests go straight to the transport (``handle_async_request``, httpx's public
interface for transports), not through ``httpx.AsyncClient.send``: the client's layers
(redirects, auth, event hooks, and a cookie jar) are all unwanted here and cost 0.2 ms
of a request (docs/performance.md). Cookies in particular must not be kept: one transport
serves every tenant, so a cookie one upstream answer set would ride along on the next
tenant's requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from proxy.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
    upstream_status_error,
)
from proxy.policy.schema import UpstreamConfig
from proxy.protocol import Kind, request_json
from proxy.redaction import Redactor
from proxy.upstream.base import DEFAULT_CAPS, ResponseCaps, api_key_from_env

_PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completions": "/completions"}

#: What httpx's client would have sent by default, less its cookie and keep-alive lines:
#: the transport pools connections itself, and the body is decoded (and capped) here.
_HEADERS = {
    "accept": "*/*",
    "accept-encoding": "gzip, deflate",
    "content-type": "application/json",
    "user-agent": "abstain-proxy",
}


def _timeout_or_connect(exc: httpx.TransportError) -> UpstreamError:
    """Classify a transport failure.

    The aiohttp transport reports a refused connection as ``ConnectTimeout``; look at
    the cause so that a dead upstream is a 502 and only a slow one is a 504.
    """
    cause = exc.__cause__
    is_timeout = isinstance(exc, httpx.TimeoutException) and (
        cause is None or isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__
    )
    if is_timeout:
        return UpstreamTimeout()
    return UpstreamUnreachable()


def _status_error(status: int, raw: bytes, headers: httpx.Headers | None = None) -> UpstreamError:
    message = ""
    try:
        data = orjson.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        message = str(err.get("message", "")) if isinstance(err, dict) else str(err or "")
    except orjson.JSONDecodeError:
        pass
    error = upstream_status_error(status, message)
    # Only the seconds form of Retry-After; an HTTP date (rare from model APIs) is ignored.
    after = headers.get("retry-after") if headers is not None else None
    try:
        seconds = float(after) if after is not None else -1.0
    except ValueError:
        seconds = -1.0
    if 0 <= seconds < float("inf"):
        error.retry_after = seconds
    return error


class OpenAIHTTPUpstream:
    """Speaks the OpenAI wire format to ``base_url``."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        transport: httpx.AsyncBaseTransport,
        env: Mapping[str, str],
        *,
        caps: ResponseCaps = DEFAULT_CAPS,
    ) -> None:
        assert config.base_url is not None
        self.name = name
        self.supports_n = config.supports_n
        base = config.base_url.rstrip("/")
        # Parsed once: httpx would otherwise re-parse the URL string on every request.
        self._urls = {kind: httpx.URL(base + path) for kind, path in _PATHS.items()}
        self._transport = transport
        self._caps = caps
        self._total = config.timeouts.total
        self._read_timeout = config.timeouts.read
        timeout = httpx.Timeout(
            connect=config.timeouts.connect,
            read=config.timeouts.read,
            write=config.timeouts.read,
            pool=config.timeouts.connect,
        )
        self._extensions = {"timeout": timeout.as_dict()}
        headers = dict(_HEADERS)
        key = api_key_from_env(config, env)
        # An upstream may echo its key back (in an error, or in a broken answer).
        self._redact = Redactor([key])
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._headers = httpx.Headers(headers)

    async def _send(self, kind: Kind, body: dict[str, Any]) -> httpx.Response:
        """The upstream's response, its body not read yet (the caller reads and closes it)."""
        request = httpx.Request(
            "POST",
            self._urls[kind],
            content=request_json(body),
            headers=self._headers,
            extensions=self._extensions,
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._total):
                response = await self._send(kind, body)
                try:
                    raw = self._redact.bytes(await self._read_capped(response))
                finally:
                    await response.aclose()
        except TimeoutError:
            raise UpstreamTimeout() from None
        except httpx.TransportError as exc:
            raise _timeout_or_connect(exc) from None
        if response.status_code >= 400:
            raise _status_error(response.status_code, raw, response.headers)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamMalformed("The upstream answer is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamMalformed("The upstream answer is not a JSON object.")
        return data

    async def _read_capped(self, response: httpx.Response) -> bytes:
        """The decoded body, refused past ``max_response_bytes``: never held whole first."""
        limit = self._caps.max_response_bytes
        parts: list[bytes] = []
        size = 0
        async for part in response.aiter_bytes():
            size += len(part)
            if size > limit:
                raise UpstreamError(
                    f"The upstream answer exceeds the limit of {limit} bytes.", kind="too_large"
                )
            parts.append(part)
        return b"".join(parts)

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        # A deadline, not one asyncio.timeout() around the whole stream: the first chunk
        # is awaited in the request handler and the rest in the response task, and a
        # timeout scope must not span both. Each read is bounded by what is left of it,
        # so a byte every half second (or a line that never ends) cannot outlive it.
        deadline = time.monotonic() + self._total
        body = {**body, "stream": True}
        try:
            response = await self._send(kind, body)
        except httpx.TransportError as exc:
            raise _timeout_or_connect(exc) from None
        try:
            if response.status_code >= 400:
                raw = self._redact.bytes(await self._read_capped(response))
                raise _status_error(response.status_code, raw, response.headers)
            _check_event_stream(response)
            lines = _lines(response, deadline, self._caps, self._read_timeout)
            async for line in lines:
                if not line.startswith("data:"):
                    continue  # comments, event names, blank separators
                payload = self._redact.known(line[5:].strip())
                if payload == "[DONE]":
                    return
                yield _chunk(payload)
            # Without [DONE] the answer may be cut short: relaying it as whole would
            # judge (and show) half an answer as if it were all of it.
            raise UpstreamMalformed("The upstream stream ended before [DONE].")
        except httpx.TransportError as exc:
            raise _timeout_or_connect(exc) from None
        finally:
            await response.aclose()


async def _lines(
    response: httpx.Response, deadline: float, caps: ResponseCaps, read_timeout: float
) -> AsyncIterator[str]:
    """The stream's lines, each read within the deadline and at most ``max_line_bytes``,
    all of them together at most ``max_response_bytes``.

    The deadline is checked after every read, so bytes that keep trickling cannot outlive
    it; a read that stalls is cut by httpx's read timeout, or, once the deadline is
    nearer than that, by a timer armed for that read only (timers cost, and most reads
    of most streams never need one).
    """
    chunks = response.aiter_bytes().__aiter__()
    pending = b""
    limit, total = caps.max_line_bytes, 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout()
        try:
            if remaining < read_timeout:
                async with asyncio.timeout(remaining):
                    data = await anext(chunks)
            else:
                data = await anext(chunks)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise UpstreamTimeout() from None
        total += len(data)
        if total > caps.max_response_bytes:
            raise UpstreamError(
                f"The upstream stream exceeds the limit of {caps.max_response_bytes} bytes.",
                kind="too_large",
            )
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
        if len(pending) > limit:
            raise UpstreamError(
                f"The upstream stream carried a line over the limit of {limit} bytes.",
                kind="too_large",
            )
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


def _check_event_stream(response: httpx.Response) -> None:
    """A stream request must be answered 2xx with server-sent events, nothing else.

    A redirect (3xx: the proxy never follows one to another host), a JSON or HTML page,
    would otherwise pass as a stream that carries no chunk: a 200 with no answer.
    """
    if not 200 <= response.status_code < 300:
        raise UpstreamMalformed(
            f"The upstream answered a stream request with status {response.status_code}."
        )
    content_type = response.headers.get("content-type", "")
    if not content_type.lower().startswith("text/event-stream"):
        shown = content_type.split(";")[0][:60] or "no content type"
        raise UpstreamMalformed(f"The upstream answered a stream request with {shown}.")


def _chunk(payload: str) -> dict[str, Any]:
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise UpstreamMalformed("The upstream stream carried a malformed chunk.") from None
    if not isinstance(chunk, dict):
        raise UpstreamMalformed("The upstream stream carried a malformed chunk.")
    if "error" in chunk and "choices" not in chunk:
        raise UpstreamError("The upstream model failed mid-stream.", kind="stream_error")
    return chunk
