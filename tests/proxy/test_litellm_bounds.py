"""A litellm upstream is bounded like an HTTP one: its answers and streams in bytes, its
streams in time.

A real HTTP server on loopback streams server-sent events to litellm's OpenAI provider.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.settings import Settings

# Not importorskip: importing litellm before the proxy sets its offline switch would make
# it fetch its cost map from the network (see test_litellm_allow_list).
if importlib.util.find_spec("litellm") is None:
    pytest.skip("litellm is not installed", allow_module_level=True)


class Streaming(ThreadingHTTPServer):
    events: int = 0
    pause: float = 0.0
    #: words of a non-streamed answer
    words: int = 1


def _event(text: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@pytest.fixture
def upstream() -> Iterator[Streaming]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            server = self.server
            assert isinstance(server, Streaming)
            request = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
            if not request.get("stream"):
                answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "x",
                          "choices": [{"index": 0, "finish_reason": "stop", "message": {
                              "role": "assistant", "content": "Paris " * server.words}}]}  # fmt: skip
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for _ in range(server.events):
                self.wfile.write(_event("Paris " * 100))
                self.wfile.flush()
                time.sleep(server.pause)
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: object) -> None:
            pass

    server = Streaming(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def client_for(tmp_path: Path, upstream: Streaming) -> Any:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"""
upstreams:
  lt:
    litellm_model: openai/x
    litellm_params: {{api_base: "http://127.0.0.1:{upstream.server_port}/v1", api_key: k}}
    timeouts: {{connect: 2, read: 5, total: 1}}
    retries: {{max_retries: 0}}
models:
  m: {{upstream: lt, streaming: passthrough}}
auth: {{unknown_keys: default, default_tenant: t}}
tenants: {{t: {{}}}}
"""
    )
    settings = Settings(
        policy=policy,
        handle_signals=False,
        reload_interval_seconds=0,
        max_upstream_response_bytes=64 * 1024,
    )
    return create_app(settings, registry=CollectorRegistry())


def last_error(text: str) -> dict[str, Any]:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text
    return dict(json.loads(events[-2])["error"])


def ask(app: Any) -> str:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.text


def test_a_stream_over_the_byte_cap_ends_with_an_error(tmp_path: Path, upstream: Streaming) -> None:
    upstream.events = 200  # ~0.7 KB of content each: far over 64 KiB
    error = last_error(ask(client_for(tmp_path, upstream)))
    assert "stream exceeds the limit of 65536 bytes" in error["message"]


def test_a_stream_past_the_total_deadline_ends_with_a_timeout(
    tmp_path: Path, upstream: Streaming
) -> None:
    upstream.events, upstream.pause = 20, 0.1  # 2 s of chunks, each within the read timeout
    assert last_error(ask(client_for(tmp_path, upstream)))["code"] == "upstream_timeout"


def test_an_answer_over_the_byte_cap_is_a_502(tmp_path: Path, upstream: Streaming) -> None:
    app = client_for(tmp_path, upstream)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app, raise_server_exceptions=False) as client:
        upstream.words = 20_000  # ~120 KB: over 64 KiB
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 502, r.text
        assert "answer exceeds the limit of 65536 bytes" in r.json()["error"]["message"]
        upstream.words = 3
        assert client.post("/v1/chat/completions", json=body).status_code == 200
