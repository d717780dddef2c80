"""A fake OpenAI-compatible model whose right and wrong answers are known in advance.

Question i asks for the capital of ``Country{i}``; the gold answer is ``City{i}``. What
the model does follows ``i % 3``:

* 0 — answers right, every token at logprob −0.05 (it knows);
* 1 — answers wrong ("Atlantis"), every token at −2.0 (it guesses, and its logprobs say so);
* 2 — every token at −0.7, right when i is even and wrong when odd (a coin flip).

So half the answers are right; a calibrated min-logprob score puts the first group near
P = 1, the coin flips near 0.5 and the guesses near 0; at t = 0.75 the proxy should
answer exactly the first group. Served as an ``httpx.MockTransport`` handler and, for
tests that go through the command line, by a small threaded HTTP server on loopback.

Samples (temperature > 0) follow :func:`sample_text`, the j-th sample of a question
cycling through a short list: on the questions it knows the samples agree (in varied
spellings that normalise alike); on the guesses they split four ways; on the coin flips
half say the right city, so a right greedy answer agrees with 4 of 8 samples and a wrong
one with 2 of 8. Agreement thus separates the coin flips that logprobs cannot.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

N = 60
_QUESTION = re.compile(r"Q: What is the capital of Country(\d+)\?\nA:$")


def questions(n: int = N) -> list[dict[str, Any]]:
    return [
        {
            "id": f"q{i}",
            "question": f"What is the capital of Country{i}?",
            "answers": [f"City{i}"],
            "kind": "capital",
        }
        for i in range(n)
    ]


def write_dataset(path: Path, n: int = N) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions(n)))
    return path


def is_right(i: int) -> bool:
    return i % 3 == 0 or (i % 3 == 2 and i % 2 == 0)


def logprob(i: int) -> float:
    return {0: -0.05, 1: -2.0, 2: -0.7}[i % 3]


def answer(i: int) -> str:
    """The greedy answer to question ``i``."""
    return f"City{i}" if is_right(i) else "Atlantis"


def sample_text(i: int, j: int) -> str:
    """The ``j``-th sample (0-based) drawn for question ``i``."""
    if i % 3 == 0:
        cycle = [f"City{i}", f"city{i}.", f"CITY{i}"]
    elif i % 3 == 1:
        cycle = ["Atlantis", "Lemuria", "Avalon", "El Dorado"]
    else:
        cycle = [f"City{i}", "Atlantis", f"City{i}", "Lemuria"]
    return cycle[j % len(cycle)]


def completion(body: dict[str, Any], draw: int = 0) -> dict[str, Any]:
    """The completion for a request body; ``draw`` numbers the question's samples."""
    match = _QUESTION.search(str(body.get("prompt", "")))
    i = int(match.group(1)) if match else -1
    if i >= 0 and float(body.get("temperature") or 0.0) > 0.0:
        tokens = [" " + sample_text(i, draw)]
    elif i >= 0 and is_right(i):
        tokens = [" City", str(i)]
    else:
        tokens = [" Atl", "antis"]
    lp = logprob(i) if i >= 0 else -3.0
    return {
        "id": f"cmpl-{i}",
        "object": "text_completion",
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "text": "".join(tokens),
                "finish_reason": "stop",
                "logprobs": {
                    "tokens": tokens,
                    "token_logprobs": [lp] * len(tokens),
                    "top_logprobs": [{t: lp, " other": lp - 1.0} for t in tokens],
                },
            }
        ],
    }


class Counter:
    """How many requests the fake model has served, and samples per prompt."""

    def __init__(self) -> None:
        self.requests = 0
        self.sampled = 0
        self._draws: dict[str, int] = {}
        self._lock = threading.Lock()

    def hit(self, body: dict[str, Any]) -> int:
        """Count a request; the number of earlier samples of its prompt (0 when greedy)."""
        with self._lock:
            self.requests += 1
            if not float(body.get("temperature") or 0.0) > 0.0:
                return 0
            self.sampled += 1
            prompt = str(body.get("prompt"))
            draw = self._draws.get(prompt, 0)
            self._draws[prompt] = draw + 1
            return draw


def transport(counter: Counter | None = None) -> httpx.MockTransport:
    seen = counter or Counter()

    def handle(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/completions"):
            seen.hit({})
            return httpx.Response(404, json={"error": {"message": "not here"}})
        body = json.loads(request.content)
        return httpx.Response(200, json=completion(body, seen.hit(body)))

    return httpx.MockTransport(handle)


@contextmanager
def serve(counter: Counter | None = None) -> Iterator[str]:
    """Run the fake model on a free loopback port; yields its ``/v1`` base URL."""
    seen = counter or Counter()
    with serve_json(lambda body: completion(body, seen.hit(body))) as url:
        yield url


@contextmanager
def serve_json(answer: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[str]:
    """A loopback HTTP server answering every POST with ``answer(body)`` as JSON; yields
    its ``/v1`` base URL (shared by the fake models of the evaluation tests)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            payload = json.dumps(answer(body)).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
