"""Slow and silent clients are bounded: header time, body time, and the key before the body."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from proxy.admission import read_body_in_time
from proxy.app import create_app
from proxy.errors import RequestTimeout
from proxy.server_protocol import HeaderTimeoutProtocol
from proxy.settings import Settings
from tests.conftest import KEYS

pytest.importorskip("httptools")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server(policy_path: Path, fake: Any) -> AsyncIterator[tuple[int, Any]]:
    app = create_app(
        Settings(policy=policy_path, handle_signals=False, reload_interval_seconds=0),
        transport=fake.transport(),
        registry=CollectorRegistry(),
        env={"FAKE_UPSTREAM_KEY": "sk-upstream-secret"},
    )
    port = free_port()
    config = uvicorn.Config(app, port=port, log_level="warning", http=HeaderTimeoutProtocol)
    config.client_header_timeout = 0.3  # type: ignore[attr-defined]
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    yield port, app
    srv.should_exit = True
    await asyncio.wait_for(task, 10)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closes the connection; bounded so a bug fails, not hangs."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except TimeoutError:
        return False


async def test_a_silent_connection_is_closed(server: tuple[int, Any]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server[0])
    assert await closed_by_server(reader)
    writer.close()


async def test_headers_sent_too_slowly_close_the_connection(server: tuple[int, Any]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server[0])
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and no more
    await writer.drain()
    assert await closed_by_server(reader)
    writer.close()


async def test_a_prompt_client_is_served_and_kept_alive(server: tuple[int, Any]) -> None:
    body = {"model": "sure", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {KEYS['chat']}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server[0]}") as client:
        for _ in range(2):  # the second request reuses the connection
            r = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text


def stalled_request(headers: list[tuple[bytes, bytes]]) -> Request:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(30)  # a body that never comes
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive)


async def test_a_body_not_sent_in_time_is_408() -> None:
    with pytest.raises(RequestTimeout):
        await read_body_in_time(stalled_request([]), 1024, 0.05)


async def test_an_unknown_key_is_refused_before_the_body_is_read(server: tuple[int, Any]) -> None:
    app = server[1]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(30)  # the body would take 30 s to arrive
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "headers": [(b"authorization", b"Bearer wrong"), (b"content-length", b"4000000")],
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"])["error"]["code"] == "invalid_api_key"
