"""An upstream answer is bounded in size and time, and its status reaches the client."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.settings import Settings

POLICY = """
upstreams:
  up:
    base_url: "http://upstream.test/v1"
    timeouts: {connect: 1, read: 5, total: 1}
    retries: {max_retries: 0}
models:
  whole: {upstream: up}
  relay: {upstream: up, streaming: passthrough}
auth: {unknown_keys: default, default_tenant: t}
tenants: {t: {}}
"""

Answer = Callable[[dict[str, Any]], httpx.Response]


class Scripted:
    def __init__(self) -> None:
        self.answer: Answer | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        assert self.answer is not None
        return self.answer(json.loads(request.content))


@pytest.fixture
def upstream() -> Scripted:
    return Scripted()


@pytest.fixture
def client(tmp_path: Path, upstream: Scripted) -> Iterator[TestClient]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    settings = Settings(
        policy=path,
        handle_signals=False,
        reload_interval_seconds=0,
        max_upstream_response_bytes=64 * 1024,
        max_upstream_line_bytes=16 * 1024,
    )
    app = create_app(
        settings, transport=httpx.MockTransport(upstream), registry=CollectorRegistry()
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def ask(client: TestClient, model: str = "whole", stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return client.post("/v1/chat/completions", json=body)


def answer_text(text: str) -> dict[str, Any]:
    lp = {"content": [{"token": "x", "logprob": -0.1}]}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp}
    return {"id": "c", "choices": [choice]}


def error_event(r: httpx.Response) -> dict[str, Any]:
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    return dict(json.loads(events[-2])["error"])


def test_an_answer_over_the_size_cap_is_a_502(client: TestClient, upstream: Scripted) -> None:
    upstream.answer = lambda body: httpx.Response(200, json=answer_text("x" * 200_000))
    r = ask(client)
    assert r.status_code == 502 and "exceeds the limit" in r.json()["error"]["message"]
    upstream.answer = lambda body: httpx.Response(200, json=answer_text("Paris"))
    assert ask(client).status_code == 200


def test_a_gzip_that_expands_past_the_cap_is_a_502(client: TestClient, upstream: Scripted) -> None:
    bomb = gzip.compress(json.dumps(answer_text(" " * 5_000_000)).encode())
    assert len(bomb) < 64 * 1024  # small on the wire, 5 MB once expanded
    upstream.answer = lambda body: httpx.Response(
        200, content=bomb, headers={"content-encoding": "gzip", "content-type": "application/json"}
    )
    r = ask(client)
    assert r.status_code == 502 and "exceeds the limit" in r.json()["error"]["message"]


def test_a_stream_line_over_the_cap_ends_with_an_error(
    client: TestClient, upstream: Scripted
) -> None:
    first = {"id": "c", "choices": [{"index": 0, "delta": {"content": "P"}}]}

    async def body() -> AsyncIterator[bytes]:
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        for _ in range(100):  # one line, never ended, 100 KB and growing
            yield b"x" * 1024

    upstream.answer = lambda _: httpx.Response(
        200, content=body(), headers={"content-type": "text/event-stream"}
    )
    r = ask(client, "relay", stream=True)
    assert r.status_code == 200
    assert "over the limit" in error_event(r)["message"]


@pytest.mark.parametrize("model", ["relay", "whole"])
def test_a_stream_over_the_total_cap_ends_with_an_error(
    client: TestClient, upstream: Scripted, model: str
) -> None:
    """Many small lines add up, and the proxy holds a streamed answer's text for its
    verdict even in passthrough."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(200):  # 200 events of ~1 KB: 200 KB, over the 64 KiB cap
            chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": "Paris " * 150}}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    upstream.answer = lambda _: httpx.Response(
        200, content=body(), headers={"content-type": "text/event-stream"}
    )
    r = ask(client, model, stream=True)
    if model == "relay":  # passthrough: the answer was streaming, so an error event
        assert r.status_code == 200
        assert "stream exceeds the limit of 65536 bytes" in error_event(r)["message"]
    else:  # buffer asks for the whole answer: nothing was sent yet, the status says it
        assert r.status_code == 502
        assert "exceeds the limit of 65536 bytes" in r.json()["error"]["message"]


def test_the_total_deadline_holds_when_bytes_keep_trickling(
    client: TestClient, upstream: Scripted
) -> None:
    first = {"id": "c", "choices": [{"index": 0, "delta": {"content": "P"}}]}

    async def body() -> AsyncIterator[bytes]:
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        for _ in range(600):  # a byte every 0.1 s: the read timeout (5 s) never fires
            await asyncio.sleep(0.1)
            yield b"x"

    upstream.answer = lambda _: httpx.Response(
        200, content=body(), headers={"content-type": "text/event-stream"}
    )
    r = ask(client, "relay", stream=True)
    assert error_event(r)["code"] == "upstream_timeout"  # the 1 s total, not 60 s of bytes


@pytest.mark.parametrize(
    ("status", "headers", "want_status", "want_retry_after"),
    [
        (422, {}, 422, None),
        (400, {}, 400, None),
        (429, {"retry-after": "7"}, 429, "7"),
        (503, {"retry-after": "3"}, 503, "3"),
        (500, {}, 502, None),
    ],
)
def test_the_upstreams_status_and_retry_after_reach_the_client(
    client: TestClient,
    upstream: Scripted,
    status: int,
    headers: dict[str, str],
    want_status: int,
    want_retry_after: str | None,
) -> None:
    upstream.answer = lambda _: httpx.Response(
        status, json={"error": {"message": "nope"}}, headers=headers
    )
    r = ask(client)
    assert r.status_code == want_status, r.text
    assert r.headers.get("retry-after") == want_retry_after
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
