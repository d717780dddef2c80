"""An OpenAI-compatible upstream over the process's shared ``httpx.AsyncClient``."""

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
from proxy.protocol import Kind
from proxy.upstream.base import api_key_from_env

_PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completions": "/completions"}


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


def _status_error(status: int, raw: bytes) -> UpstreamError:
    message = ""
    try:
        data = orjson.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        message = str(err.get("message", "")) if isinstance(err, dict) else str(err or "")
    except orjson.JSONDecodeError:
        pass
    return upstream_status_error(status, message)


class OpenAIHTTPUpstream:
    """Speaks the OpenAI wire format to ``base_url``."""

    def __init__(
        self, name: str, config: UpstreamConfig, client: httpx.AsyncClient, env: Mapping[str, str]
    ) -> None:
        assert config.base_url is not None
        self.name = name
        self.supports_n = config.supports_n
        base = config.base_url.rstrip("/")
        # Parsed once: httpx would otherwise re-parse the URL string on every request.
        self._urls = {kind: httpx.URL(base + path) for kind, path in _PATHS.items()}
        self._client = client
        self._total = config.timeouts.total
        self._timeout = httpx.Timeout(
            connect=config.timeouts.connect,
            read=config.timeouts.read,
            write=config.timeouts.read,
            pool=config.timeouts.connect,
        )
        self._headers = {"content-type": "application/json"}
        key = api_key_from_env(config, env)
        if key:
            self._headers["authorization"] = f"Bearer {key}"

    def _request(self, kind: Kind, body: dict[str, Any]) -> httpx.Request:
        return self._client.build_request(
            "POST",
            self._urls[kind],
            content=orjson.dumps(body),
            headers=self._headers,
            timeout=self._timeout,
        )

    async def complete(self, kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._total):
                response = await self._client.send(self._request(kind, body))
                raw = await response.aread()
        except TimeoutError:
            raise UpstreamTimeout() from None
        except httpx.TransportError as exc:
            raise _timeout_or_connect(exc) from None
        if response.status_code >= 400:
            raise _status_error(response.status_code, raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamMalformed("The upstream answer is not JSON.") from None
        if not isinstance(data, dict):
            raise UpstreamMalformed("The upstream answer is not a JSON object.")
        return data

    async def stream(self, kind: Kind, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        # A deadline, not asyncio.timeout(): the first chunk is awaited in the request
        # handler and the rest in the response task, and a timeout scope must not span both.
        deadline = time.monotonic() + self._total
        body = {**body, "stream": True}
        try:
            response = await self._client.send(self._request(kind, body), stream=True)
        except httpx.TransportError as exc:
            raise _timeout_or_connect(exc) from None
        try:
            if response.status_code >= 400:
                raise _status_error(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if time.monotonic() > deadline:
                    raise UpstreamTimeout()
                if not line.startswith("data:"):
                    continue  # comments, event names, blank separators
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                yield _chunk(payload)
        except httpx.TransportError as exc:
            raise _timeout_or_connect(exc) from None
        finally:
            await response.aclose()


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
