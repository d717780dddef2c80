"""An OpenAI-compatible upstream: the wire format, over the process's shared wire.

The bytes travel on a :class:`~proxy.upstream.wire.Wire` (aiohttp's pool in service,
any httpx transport in tests); this module builds the request, bounds what it reads
(size, line length, deadline), and turns the answer, or its failure, into a completion
or an :class:`~proxy.errors.UpstreamError`. Secrets the upstream echoes back are
redacted before anything else sees the bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from proxy.errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamTimeout,
    upstream_status_error,
)
from proxy.policy.schema import UpstreamConfig
from proxy.protocol import Kind, request_json
from proxy.redaction import Redactor
from proxy.upstream.base import DEFAULT_CAPS, ResponseCaps, api_key_from_env
from proxy.upstream.wire import Timeouts, Wire, WireResponse

_PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completions": "/completions"}

#: What an HTTP client sends by default, less cookies: the wire pools connections
#: itself, and the body is decoded (and capped) here.
_HEADERS = {
    "accept": "*/*",
    "accept-encoding": "gzip, deflate",
    "content-type": "application/json",
    "user-agent": "abstain-proxy",
}


def _status_error(status: int, raw: bytes, retry_after: str | None = None) -> UpstreamError:
    message = ""
    try:
        data = orjson.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        message = str(err.get("message", "")) if isinstance(err, dict) else str(err or "")
    except orjson.JSONDecodeError:
        pass
    error = upstream_status_error(status, message)
    # Only the seconds form of Retry-After; an HTTP date (rare from model APIs) is ignored.
    try:
        seconds = float(retry_after) if retry_after is not None else -1.0
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
        wire: Wire,
        env: Mapping[str, str],
        *,
        caps: ResponseCaps = DEFAULT_CAPS,
    ) -> None:
        assert config.base_url is not None
        self.name = name
        self.supports_n = config.supports_n
        self._caps = caps
        self._total = config.timeouts.total
        self._read_timeout = config.timeouts.read
        headers = dict(_HEADERS)
        key = api_key_from_env(config, env)
        # An upstream may echo its key back (in an error, or in a broken answer).
        self._redact = Redactor([key])
        if key:
            headers["authorization"] = f"Bearer {key}"
        timeouts = Timeouts(connect=config.timeouts.connect, read=config.timeouts.read)
        base = config.base_url.rstrip("/")
        # Prepared once per policy load: URL, headers and timeouts are not rebuilt per call.
        self._endpoints = {
            kind: wire.endpoint(base + path, headers, timeouts) for kind, path in _PATHS.items()
        }

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._total):
                response = await self._endpoints[kind].post(request_json(body))
                try:
                    raw = self._redact.bytes(await self._read_capped(response))
                finally:
                    await response.aclose()
        except TimeoutError:
            raise UpstreamTimeout() from None
        if response.status >= 400:
            raise _status_error(response.status, raw, response.header("retry-after"))
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamMalformed("The upstream answer is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamMalformed("The upstream answer is not a JSON object.")
        return data

    async def _read_capped(self, response: WireResponse) -> bytes:
        """The decoded body, refused past ``max_response_bytes``: never held whole first."""
        limit = self._caps.max_response_bytes
        parts: list[bytes] = []
        size = 0
        async for part in response.chunks():
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
        response = await self._endpoints[kind].post(request_json(body))
        try:
            if response.status >= 400:
                raw = self._redact.bytes(await self._read_capped(response))
                raise _status_error(response.status, raw, response.header("retry-after"))
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
        finally:
            await response.aclose()


async def _lines(
    response: WireResponse, deadline: float, caps: ResponseCaps, read_timeout: float
) -> AsyncIterator[str]:
    """The stream's lines, each read within the deadline and at most ``max_line_bytes``,
    all of them together at most ``max_response_bytes``.

    The deadline is checked after every read, so bytes that keep trickling cannot outlive
    it; a read that stalls is cut by the wire's read timeout, or, once the deadline is
    nearer than that, by a timer armed for that read only (timers cost, and most reads
    of most streams never need one).
    """
    chunks = response.chunks().__aiter__()
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


def _check_event_stream(response: WireResponse) -> None:
    """A stream request must be answered 2xx with server-sent events, nothing else.

    A redirect (3xx: the proxy never follows one to another host), a JSON or HTML page,
    would otherwise pass as a stream that carries no chunk: a 200 with no answer.
    """
    if not 200 <= response.status < 300:
        raise UpstreamMalformed(
            f"The upstream answered a stream request with status {response.status}."
        )
    content_type = response.header("content-type") or ""
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
