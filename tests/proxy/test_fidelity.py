"""The client gets exactly the logprobs it asked for, whatever the proxy asked upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import auth

PROMPT = "Q: capital of France?\nA:"
CHAT = [{"role": "user", "content": "capital of France?"}]


def streamed_logprobs(r: Any) -> list[Any]:
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: {")]
    return [
        c.get("logprobs")
        for e in events
        for c in json.loads(e).get("choices", [])
        if c.get("logprobs")
    ]


def top_sizes(kind: str, logprobs: Any) -> list[int]:
    if kind == "chat":
        return [len(t["top_logprobs"]) for t in logprobs["content"]]
    return [len(top) for top in logprobs["top_logprobs"]]


@pytest.mark.parametrize("tenant", ["chat", "tool"])  # buffer, passthrough
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("asked", [0, 2])
def test_chat_gets_the_top_logprobs_it_asked_for(
    client: TestClient, fake: Any, tenant: str, stream: bool, asked: int
) -> None:
    body: dict[str, Any] = {"model": "sure", "messages": CHAT, "logprobs": True, "stream": stream}
    if asked:
        body["top_logprobs"] = asked
    r = client.post("/v1/chat/completions", json=body, headers=auth(tenant))
    assert r.status_code == 200, r.text
    assert fake.requests[-1]["top_logprobs"] == 5  # the proxy's own, wider ask
    found = streamed_logprobs(r) if stream else [r.json()["choices"][0]["logprobs"]]
    sizes = [n for lp in found for n in top_sizes("chat", lp)]
    assert sizes and all(n == asked for n in sizes), sizes


@pytest.mark.parametrize("tenant", ["chat", "tool"])
@pytest.mark.parametrize("stream", [False, True])
def test_completions_get_the_alternatives_they_asked_for(
    client: TestClient, fake: Any, tenant: str, stream: bool
) -> None:
    body = {"model": "sure", "prompt": PROMPT, "logprobs": 2, "stream": stream}
    r = client.post("/v1/completions", json=body, headers=auth(tenant))
    assert r.status_code == 200, r.text
    assert fake.requests[-1]["logprobs"] == 5
    found = streamed_logprobs(r) if stream else [r.json()["choices"][0]["logprobs"]]
    sizes = [n for lp in found for n in top_sizes("completions", lp)]
    assert sizes and all(n == 2 for n in sizes), sizes
    best = found[0]["top_logprobs"][0]
    assert max(best.values()) == found[0]["token_logprobs"][0]  # the best ones are kept


def test_a_client_asking_for_more_gets_more(client: TestClient, fake: Any) -> None:
    body = {"model": "sure", "messages": CHAT, "logprobs": True, "top_logprobs": 8}
    r = client.post("/v1/chat/completions", json=body, headers=auth())
    assert fake.requests[-1]["top_logprobs"] == 8
    assert top_sizes("chat", r.json()["choices"][0]["logprobs"])[0] == 8
