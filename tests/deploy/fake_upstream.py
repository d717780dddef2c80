"""A small OpenAI-compatible upstream on loopback, for the deployment tests.

It runs in a thread of the test process (standard library only), so a proxy started as
a subprocess can reach it over real TCP. Its answers follow the model name:

* ``sure``: every token has logprob -0.01, so the proxy answers (P ~ 0.99 > 0.5);
* ``unsure``: every token has logprob -3.0, so the proxy abstains (P ~ 0.05);
* ``error-500``: the upstream fails, which the proxy counts as an upstream error.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOGPROB = {"sure": -0.01, "unsure": -3.0}
TOKENS = ["Paris", "."]


def _chat(model: str) -> dict[str, Any]:
    lp = LOGPROB.get(model, -0.01)
    content = [{"token": t, "logprob": lp, "top_logprobs": []} for t in TOKENS]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(TOKENS)},
                "logprobs": {"content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(TOKENS), "total_tokens": 7},
    }


def _completion(model: str) -> dict[str, Any]:
    lp = LOGPROB.get(model, -0.01)
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": "".join(TOKENS),
                "logprobs": {"tokens": TOKENS, "token_logprobs": [lp] * len(TOKENS)},
                "finish_reason": "stop",
            }
        ],
    }


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the proxy's pooled connections alive, as a real server would.
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            data = [{"id": m, "object": "model"} for m in LOGPROB]
            self._send(200, {"object": "list", "data": data})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        model = str(request.get("model", ""))
        if model == "error-500":
            self._send(500, {"error": {"message": "the fake upstream failed on purpose"}})
        elif self.path == "/v1/chat/completions":
            self._send(200, _chat(model))
        elif self.path == "/v1/completions":
            self._send(200, _completion(model))
        else:
            self._send(404, {"error": {"message": "not found"}})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest's output for failures


@contextmanager
def fake_upstream() -> Iterator[str]:
    """Serve on a free loopback port; yields the base URL (``http://127.0.0.1:PORT/v1``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
