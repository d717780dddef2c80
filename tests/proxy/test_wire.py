"""Both wires against a real loopback server: the same bytes, the same failures.

The proxy serves on :class:`~proxy.upstream.wire.AiohttpWire`; most proxy tests inject
an httpx transport (:class:`~proxy.upstream.wire.HttpxWire`). Each case here runs on
both, so what the injected tests establish holds for the wire in service.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from proxy.policy.schema import UpstreamConfig
from proxy.upstream.base import ResponseCaps
from proxy.upstream.openai_http import OpenAIHTTPUpstream
from proxy.upstream.wire import AiohttpWire, HttpxWire, Wire

ANSWER = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}]}
BOMB = gzip.compress(orjson.dumps({"id": "c", "pad": " " * 5_000_000}))


class Upstream:
    """A loopback aiohttp server; each test sets what it answers and reads what it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answer: Callable[[web.Request], Any] = lambda r: web.json_response(ANSWER)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append({"headers": dict(request.headers), "body": await request.read(),
                          "path": request.path})  # fmt: skip
        result = self.answer(request)
        if asyncio.iscoroutine(result):
            result = await result
        assert isinstance(result, web.StreamResponse)
        return result


@pytest.fixture
async def server() -> AsyncIterator[tuple[Upstream, str]]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", upstream.handle)
    # A short grace: the silent handlers are left asleep when a test ends.
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield upstream, f"http://127.0.0.1:{port}/v1"
    await runner.shutdown()
    await runner.cleanup()


@pytest.fixture(params=["aiohttp", "httpx"])
async def wire(request: pytest.FixtureRequest) -> AsyncIterator[Wire]:
    made: Wire = (
        AiohttpWire(8) if request.param == "aiohttp" else HttpxWire(httpx.AsyncHTTPTransport())
    )
    yield made
    await made.aclose()


def upstream_on(wire: Wire, base_url: str, **timeouts: float) -> OpenAIHTTPUpstream:
    config = UpstreamConfig.model_validate(
        {"base_url": base_url, "api_key_env": "KEY", "timeouts": {"read": 1.0, **timeouts}}
    )
    caps = ResponseCaps(max_response_bytes=1024 * 1024, max_line_bytes=64 * 1024)
    return OpenAIHTTPUpstream("up", config, wire, {"KEY": "sk-secret-1234"}, caps=caps)


async def test_a_request_carries_the_key_and_the_json_body(
    server: tuple[Upstream, str], wire: Wire
) -> None:
    upstream, url = server
    got = await upstream_on(wire, url).complete("chat", {"model": "m", "messages": []})
    assert got == ANSWER
    seen = upstream.seen[0]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["Authorization"] == "Bearer sk-secret-1234"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["User-Agent"] == "abstain-proxy"
    assert orjson.loads(seen["body"]) == {"model": "m", "messages": []}


async def test_no_cookie_an_upstream_set_is_sent_again(
    server: tuple[Upstream, str], wire: Wire
) -> None:
    upstream, url = server

    def with_cookie(request: web.Request) -> web.Response:
        response = web.json_response(ANSWER)
        response.set_cookie("session", "tenant-a-secret")
        return response

    upstream.answer = with_cookie
    up = upstream_on(wire, url)
    await up.complete("chat", {})
    await up.complete("chat", {})
    assert "Cookie" not in upstream.seen[1]["headers"]


async def test_a_gzip_that_expands_past_the_cap_is_refused(
    server: tuple[Upstream, str], wire: Wire
) -> None:
    upstream, url = server
    upstream.answer = lambda r: web.Response(
        body=BOMB, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    with pytest.raises(UpstreamError, match="exceeds the limit"):
        await upstream_on(wire, url).complete("chat", {})
    # the connection was not handed back half read: the next answer is whole
    upstream.answer = lambda r: web.json_response(ANSWER)
    assert await upstream_on(wire, url).complete("chat", {}) == ANSWER


async def test_a_gzip_answer_is_decoded(server: tuple[Upstream, str], wire: Wire) -> None:
    upstream, url = server
    packed = gzip.compress(orjson.dumps(ANSWER))
    upstream.answer = lambda r: web.Response(
        body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert await upstream_on(wire, url).complete("chat", {}) == ANSWER


async def test_a_status_error_keeps_its_status_and_retry_after_and_loses_the_key(
    server: tuple[Upstream, str], wire: Wire
) -> None:
    upstream, url = server
    message = {"error": {"message": "Invalid key provided: Bearer sk-secret-1234"}}
    upstream.answer = lambda r: web.json_response(message, status=429, headers={"Retry-After": "3"})
    with pytest.raises(UpstreamError) as caught:
        await upstream_on(wire, url).complete("chat", {})
    assert caught.value.status == 429 and caught.value.retry_after == 3.0
    assert "sk-secret-1234" not in str(caught.value)


async def test_a_silent_upstream_is_a_timeout(server: tuple[Upstream, str], wire: Wire) -> None:
    upstream, url = server

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response(ANSWER)

    upstream.answer = silent
    with pytest.raises(UpstreamTimeout):
        await upstream_on(wire, url, read=0.2).complete("chat", {})


async def test_a_body_that_stalls_is_a_timeout(server: tuple[Upstream, str], wire: Wire) -> None:
    upstream, url = server

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"id": ')
        await asyncio.sleep(5)
        return response

    upstream.answer = stall
    with pytest.raises(UpstreamTimeout):
        await upstream_on(wire, url, read=0.2).complete("chat", {})


async def test_a_refused_connection_is_unreachable(wire: Wire) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(UpstreamUnreachable):
        await upstream_on(wire, f"http://127.0.0.1:{port}/v1").complete("chat", {})


async def test_a_connection_reset_mid_body_is_unreachable(
    server: tuple[Upstream, str], wire: Wire
) -> None:
    upstream, url = server

    async def reset(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 10_000
        await response.prepare(request)
        await response.write(b'{"id": "c", ')
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.answer = reset
    with pytest.raises(UpstreamUnreachable):
        await upstream_on(wire, url).complete("chat", {})


async def test_a_stream_arrives_chunk_by_chunk(server: tuple[Upstream, str], wire: Wire) -> None:
    upstream, url = server
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": t}}]} for t in "abc"]

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            # split inside the line: the reader must join the pieces
            line = b"data: " + orjson.dumps(chunk) + b"\n\n"
            await response.write(line[:7])
            await response.write(line[7:])
        await response.write(b"data: [DONE]\n\n")
        return response

    upstream.answer = events
    got = [c async for c in upstream_on(wire, url).stream("chat", {})]
    assert got == chunks
    assert orjson.loads(upstream.seen[0]["body"])["stream"] is True


async def test_a_stream_answered_with_json_is_malformed(
    server: tuple[Upstream, str], wire: Wire
) -> None:
    _, url = server
    with pytest.raises(UpstreamError, match="application/json"):
        _ = [c async for c in upstream_on(wire, url).stream("chat", {})]
