"""A client that goes away cancels its upstream call, in every mode, before any byte.

A real uvicorn server runs the app on loopback in the test's event loop; a raw socket
sends a request and closes; the slow upstream (a MockTransport handler) must see its
call cancelled rather than run on to its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.settings import Settings

POLICY = """
upstreams:
  up: {base_url: "http://upstream.test/v1"}
models:
  whole: {upstream: up, keepalive_seconds: 30}
  relay: {upstream: up, streaming: passthrough}
auth: {unknown_keys: default, default_tenant: t}
tenants: {t: {}}
"""


class Stalling:
    """An upstream that never answers; it records whether its call was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return httpx.Response(500)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("model", "stream"), [("whole", False), ("whole", True), ("relay", True)]
)  # non-streaming, buffer, passthrough
async def test_a_client_that_goes_away_cancels_the_upstream_call(
    tmp_path: Path, model: str, stream: bool
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    upstream = Stalling()
    app = create_app(
        Settings(policy=path, handle_signals=False, reload_interval_seconds=0),
        transport=httpx.MockTransport(upstream),
        registry=CollectorRegistry(),
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        ).encode()
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await asyncio.wait_for(upstream.started.wait(), 10)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        # Bounded wait for the outcome, not a timing claim: without cancellation the
        # upstream call would sit in its 60 s sleep and this would time out.
        await asyncio.wait_for(upstream.cancelled.wait(), 10)
        metrics = app.state.metrics.registry
        assert (
            metrics.get_sample_value(
                "abstain_requests_total",
                {
                    "tenant": "t",
                    "model": model,
                    "route": "chat",
                    "decision": "none",
                    "status": "499",
                },
            )
            == 1.0
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
