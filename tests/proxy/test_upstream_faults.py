"""A broken upstream gets a clear error, never a 500 and never a silently broken stream.

One fault-injecting upstream (an ``httpx.MockTransport`` handler whose answer the test
sets) is driven through non-streaming, buffer and passthrough requests, for chat and
completions. Each case asserts what the client gets, and that the proxy still serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
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
  up: {base_url: "http://upstream.test/v1", api_key_env: UP_KEY}
models:
  whole: {upstream: up}
  relay: {upstream: up, streaming: passthrough}
auth: {unknown_keys: default, default_tenant: t}
tenants: {t: {}}
"""
SECRET = "sk-upstream-secret-123456"

Answer = Callable[[str, dict[str, Any]], httpx.Response]


def good_chunks(kind: str) -> list[dict[str, Any]]:
    if kind == "chat":
        lp = {"content": [{"token": "Paris", "logprob": -0.01, "top_logprobs": []}]}
        return [
            {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Paris"}, "logprobs": lp}]}
        ]
    lp = {"tokens": ["Paris"], "token_logprobs": [-0.01], "top_logprobs": [{"Paris": -0.01}]}
    return [{"id": "c1", "choices": [{"index": 0, "text": "Paris", "logprobs": lp}]}]


def sse(chunks: list[dict[str, Any]], done: bool = True) -> httpx.Response:
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return httpx.Response(
        200,
        content=body + (b"data: [DONE]\n\n" if done else b""),
        headers={"content-type": "text/event-stream"},
    )


def answer_with(logprobs: Any = None, message: Any = None) -> Answer:
    """A completion whose logprobs (or chat message) the test sets."""

    def answer(kind: str, body: dict[str, Any]) -> httpx.Response:
        if kind == "chat":
            msg = {"role": "assistant", "content": "Paris"} if message is None else message
            choice = {"index": 0, "message": msg, "logprobs": logprobs, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": "Paris", "logprobs": logprobs, "finish_reason": "stop"}
        if body.get("stream"):
            delta: dict[str, Any] = {"index": 0, "logprobs": logprobs}
            if kind == "chat":
                delta["delta"] = {"content": "Paris"} if message is None else message
            else:
                delta["text"] = "Paris"
            return sse([{"id": "c1", "choices": [delta]}])
        return httpx.Response(200, json={"id": "c1", "choices": [choice]})

    return answer


class Faulty:
    """The upstream: answers every request with what ``answer`` says (good by default)."""

    def __init__(self) -> None:
        self.answer: Answer | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        kind = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        body = json.loads(request.content)
        if self.answer is not None:
            return self.answer(kind, body)
        if body.get("stream"):
            return sse(good_chunks(kind))
        return answer_with(
            {"content": [{"token": "Paris", "logprob": -0.01}]}
            if kind == "chat"
            else {"token_logprobs": [-0.01]}
        )(kind, body)


@pytest.fixture
def upstream() -> Faulty:
    return Faulty()


@pytest.fixture
def client(tmp_path: Path, upstream: Faulty) -> Iterator[TestClient]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    app = create_app(
        Settings(policy=path, handle_signals=False, reload_interval_seconds=0),
        transport=httpx.MockTransport(upstream),
        registry=CollectorRegistry(),
        env={"UP_KEY": SECRET},
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def request(client: TestClient, kind: str, mode: str) -> httpx.Response:
    body: dict[str, Any] = {"model": "relay" if mode == "passthrough" else "whole"}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "Capital of France?"}]
    else:
        body["prompt"] = "Capital of France?"
    if mode != "plain":
        body["stream"] = True
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    return client.post(path, json=body)


def assert_clear_failure(r: httpx.Response) -> None:
    """A 502 in OpenAI's shape, or a 200 stream that ends with an error event and [DONE]."""
    if r.status_code == 200:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text
        last = json.loads(events[-2])
        assert last["error"]["type"] == "upstream_error", r.text
    else:
        assert r.status_code == 502, r.text
        assert r.json()["error"]["type"] == "upstream_error"


def still_serves(client: TestClient, upstream: Faulty) -> None:
    upstream.answer = None
    for kind in ("chat", "completions"):
        r = request(client, kind, "plain")
        assert r.status_code == 200, r.text
        assert r.json()["abstention"]["decision"] == "answer"


CHAT_LP = {"content": [{"token": "Paris", "logprob": -0.01, "top_logprobs": []}]}
FAULTS: dict[str, Answer] = {
    "logprobs a string": answer_with("oops"),
    "logprobs a list": answer_with([1, 2]),
    "logprobs content a dict": answer_with({"content": {"a": 1}, "token_logprobs": {"a": 1}}),
    "a logprob that is text": answer_with(
        {"content": [{"token": "P", "logprob": "high"}], "token_logprobs": ["high"]}
    ),
    "a logprob of 800": answer_with(
        {"content": [{"token": "P", "logprob": 800}], "token_logprobs": [800]}
    ),
    "1000 tokens of +1.0": answer_with(
        {"content": [{"token": "P", "logprob": 1.0}] * 1000, "token_logprobs": [1.0] * 1000}
    ),
    "a top-k entry that is a number": answer_with(
        {
            "content": [{"token": "P", "logprob": -0.1, "top_logprobs": [3]}],
            "token_logprobs": [-0.1],
            "top_logprobs": [3],
        }
    ),
}
CHAT_ONLY: dict[str, Answer] = {
    "message a string": answer_with(CHAT_LP, message="Paris"),
    "message a list": answer_with(CHAT_LP, message=["Paris"]),
}


@pytest.mark.parametrize("mode", ["plain", "buffer", "passthrough"])
@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_malformed_answers_are_a_clear_error(
    client: TestClient, upstream: Faulty, fault: str, kind: str, mode: str
) -> None:
    upstream.answer = FAULTS[fault]
    assert_clear_failure(request(client, kind, mode))
    still_serves(client, upstream)


@pytest.mark.parametrize("mode", ["plain", "buffer", "passthrough"])
@pytest.mark.parametrize("fault", sorted(CHAT_ONLY))
def test_a_chat_message_that_is_not_an_object_is_a_clear_error(
    client: TestClient, upstream: Faulty, fault: str, mode: str
) -> None:
    upstream.answer = CHAT_ONLY[fault]
    assert_clear_failure(request(client, "chat", mode))
    still_serves(client, upstream)


def chunk_fault(change: Callable[[dict[str, Any]], None]) -> Answer:
    def answer(kind: str, body: dict[str, Any]) -> httpx.Response:
        chunks = good_chunks(kind)
        change(chunks[0]["choices"][0])
        return sse(chunks)

    return answer


STREAM_FAULTS: dict[str, Answer] = {
    "delta a string": chunk_fault(lambda c: c.update(delta="Paris")),
    "index an object": chunk_fault(lambda c: c.update(index={"i": 0})),
    "bad logprob entries": chunk_fault(lambda c: c.update(logprobs={"content": ["x"]})),
    "JSON instead of a stream": lambda kind, body: httpx.Response(
        200, json={"id": "x", "choices": []}
    ),
    "HTML instead of a stream": lambda kind, body: httpx.Response(
        200, content=b"<html>hi</html>", headers={"content-type": "text/html"}
    ),
    "a redirect": lambda kind, body: httpx.Response(302, headers={"location": "http://elsewhere/"}),
    "HTML labelled text/event-stream": lambda kind, body: httpx.Response(
        200, content=b"<html>hi</html>\n", headers={"content-type": "text/event-stream"}
    ),
    "a stream cut before [DONE]": lambda kind, body: sse(good_chunks(kind), done=False),
}


@pytest.mark.parametrize(
    ("fault", "kind"),
    # A completions chunk has no delta: a string there is no fault of that wire shape.
    [
        (f, k)
        for f in sorted(STREAM_FAULTS)
        for k in ("chat", "completions")
        if (f, k) != ("delta a string", "completions")
    ],
)
def test_a_broken_passthrough_stream_is_never_a_silent_200(
    client: TestClient, upstream: Faulty, fault: str, kind: str
) -> None:
    upstream.answer = STREAM_FAULTS[fault]
    assert_clear_failure(request(client, kind, "passthrough"))
    still_serves(client, upstream)


def test_an_upstream_error_that_echoes_the_key_reveals_nothing(
    client: TestClient, upstream: Faulty
) -> None:
    upstream.answer = lambda kind, body: httpx.Response(
        400, json={"error": {"message": f"Invalid key provided: Bearer {SECRET}"}}
    )
    for mode in ("plain", "buffer", "passthrough"):
        r = request(client, "chat", mode)
        assert r.status_code == 400, r.text
        assert SECRET not in r.text and "upstream-secret" not in r.text
        assert "Invalid key provided" in r.json()["error"]["message"]


def test_an_answer_that_echoes_the_key_reveals_nothing(
    client: TestClient, upstream: Faulty
) -> None:
    upstream.answer = answer_with(
        CHAT_LP, message={"role": "assistant", "content": f"the key is {SECRET}"}
    )
    for mode in ("plain", "buffer", "passthrough"):
        r = request(client, "chat", mode)
        assert r.status_code == 200, r.text
        assert SECRET not in r.text
