"""``stream: true`` in both policy modes."""

from __future__ import annotations

import json
from typing import Any

from starlette.testclient import TestClient

from tests.conftest import auth
from tests.fakes import ANSWER, TOKENS, FakeUpstream

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def events(text: str) -> list[Any]:
    """Parse an SSE body into JSON payloads, with the literal '[DONE]' kept as a string."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream(client: TestClient, route: str, tenant: str, **body: Any):
    r = client.post(f"/v1/{route}", json={**body, "stream": True}, headers=auth(tenant))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return r, events(r.text)


def chat_text(evs: list[Any]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or ""
        for e in evs
        if isinstance(e, dict)
        for c in e.get("choices", [])
    )


def test_buffer_mode_streams_the_abstention_instead_of_the_answer(client: TestClient) -> None:
    r, evs = stream(client, "chat/completions", "clinic", model="unsure", **CHAT)
    assert evs[-1] == "[DONE]"
    assert chat_text(evs) == "Please ask a clinician."
    assert evs[-2]["abstention"]["decision"] == "abstain"
    assert r.headers["x-abstention-decision"] == "abstain"


def test_buffer_mode_streams_a_confident_answer(client: TestClient, fake: FakeUpstream) -> None:
    _, evs = stream(client, "chat/completions", "clinic", model="sure", **CHAT)
    assert chat_text(evs) == ANSWER
    assert evs[-2]["abstention"]["decision"] == "answer"
    finish = [c["finish_reason"] for e in evs[:-1] for c in e["choices"] if c.get("finish_reason")]
    assert finish == ["stop"]
    # Buffer mode judges the whole answer: it asks upstream for it whole.
    assert "stream" not in fake.requests[-1]


def test_buffer_mode_completions(client: TestClient) -> None:
    _, evs = stream(client, "completions", "clinic", model="unsure", prompt="Q: x\nA:")
    texts = "".join(c["text"] for e in evs[:-1] for c in e["choices"])
    assert texts == "Please ask a clinician."
    assert evs[-1] == "[DONE]"


def test_buffer_mode_sends_keepalives_while_waiting(client: TestClient) -> None:
    # 'slow' has keep-alives every 0.2 s and a 1 s upstream timeout in the test policy.
    r = client.post(
        "/v1/chat/completions",
        json={"model": "slow", **CHAT, "stream": True, "x_sleep": 0.7},
        headers=auth("clinic"),
    )
    assert r.text.startswith(": keep-alive\n\n")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    assert evs[-2]["abstention"]["decision"] == "answer"


def test_buffer_mode_timeout_after_keepalives_is_an_error_event(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "slow", **CHAT, "stream": True, "x_sleep": 3},
        headers=auth("clinic"),
    )
    assert r.status_code == 200  # headers went out with the first keep-alive
    evs = events(r.text)
    assert evs[-2]["error"]["code"] == "upstream_timeout"
    assert evs[-1] == "[DONE]"


def test_buffer_mode_upstream_error_keeps_its_status(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "error-500", **CHAT, "stream": True},
        headers=auth("clinic"),
    )
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"


def test_passthrough_relays_tokens_and_ends_with_the_verdict(
    client: TestClient, fake: FakeUpstream
) -> None:
    _, evs = stream(client, "chat/completions", "tool", model="unsure", **CHAT)
    assert fake.requests[-1]["stream"] is True
    assert fake.requests[-1]["logprobs"] is True
    assert chat_text(evs) == "".join(TOKENS)  # passthrough cannot retract
    verdict = evs[-2]["abstention"]
    assert verdict["decision"] == "annotate"
    assert verdict["confidence"] < 0.1
    assert evs[-2]["choices"] == []
    # Logprobs the client did not ask for are stripped from every relayed chunk.
    assert all(c.get("logprobs") is None for e in evs[:-2] for c in e["choices"])


def test_passthrough_keeps_logprobs_the_client_asked_for(client: TestClient) -> None:
    _, evs = stream(client, "chat/completions", "tool", model="sure", logprobs=True, **CHAT)
    assert evs[0]["choices"][0]["logprobs"]["content"][0]["token"] == TOKENS[0]
    assert evs[-2]["abstention"]["decision"] == "answer"


def test_passthrough_completions(client: TestClient) -> None:
    _, evs = stream(client, "completions", "tool", model="sure", prompt="Q: x\nA:")
    text = "".join(c["text"] for e in evs[:-2] for c in e["choices"])
    assert text == "".join(TOKENS)
    assert evs[-2]["abstention"]["decision"] == "answer"


def test_passthrough_upstream_error_before_first_chunk_keeps_its_status(
    client: TestClient,
) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "error-500", **CHAT, "stream": True},
        headers=auth("tool"),
    )
    assert r.status_code == 502
