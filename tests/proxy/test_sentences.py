"""Sentence granularity through the proxy: the unsure sentence withheld, the rest kept.

The upstream is a mock whose tokens and logprobs the test sets, one sure sentence and
one unsure, so what the proxy keeps is known in advance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.settings import Settings

SURE, UNSURE = math.log(0.95), math.log(0.05)
#: "Peru is in South America. Its capital is Lima. Its currency is the peseta."
TOKENS: list[tuple[str, float]] = [
    ("Peru", SURE), (" is", SURE), (" in", SURE), (" South", SURE), (" America", SURE),
    (".", SURE), (" Its", SURE), (" capital", SURE), (" is", SURE), (" Lima", SURE), (".", SURE),
    (" Its", SURE), (" currency", SURE), (" is", SURE), (" the", SURE), (" pes", UNSURE),
    ("eta", SURE), (".", SURE),
]  # fmt: skip
TEXT = "".join(t for t, _ in TOKENS)
KEPT = "Peru is in South America. Its capital is Lima. (not sure about this part)"

POLICY = """
upstreams:
  mock: {base_url: "http://upstream.test/v1"}
models:
  peru: {upstream: mock, granularity: sentence}
  peru-hedge: {upstream: mock, upstream_model: peru, granularity: sentence, action: hedge}
  peru-whole: {upstream: mock, upstream_model: peru}
defaults: {threshold: 0.5, action: abstain, score: min_logprob}
auth: {unknown_keys: default, default_tenant: public}
tenants: {public: {}}
"""


def chat_logprobs(tokens: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "content": [
            {"token": t, "logprob": lp, "top_logprobs": [{"token": t, "logprob": lp}]}
            for t, lp in tokens
        ]
    }


def response(kind: str, n: int) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for i in range(n):
        # Choice 1 (with n = 2) is sure of every sentence.
        tokens = TOKENS if i == 0 else [(t, SURE) for t, _ in TOKENS]
        if kind == "chat":
            choices.append({"index": i, "finish_reason": "stop", "logprobs": chat_logprobs(tokens),
                            "message": {"role": "assistant", "content": TEXT}})  # fmt: skip
        else:
            logprobs = {"tokens": [t for t, _ in tokens], "token_logprobs": [lp for _, lp in tokens],
                        "top_logprobs": [{t: lp} for t, lp in tokens]}  # fmt: skip
            choices.append({"index": i, "finish_reason": "stop", "text": TEXT,
                            "logprobs": logprobs})  # fmt: skip
    return {"id": "cmpl-peru", "object": "x", "created": 1, "model": "peru", "choices": choices}


async def upstream(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    kind = "chat" if request.url.path.endswith("/chat/completions") else "completions"
    return httpx.Response(200, json=response(kind, body.get("n") or 1))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    settings = Settings(policy=path, handle_signals=False, reload_interval_seconds=0)
    app = create_app(
        settings, transport=httpx.MockTransport(upstream), registry=CollectorRegistry()
    )
    with TestClient(app) as c:
        yield c


def ask(client: TestClient, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about Peru."}]}
    r = client.post("/v1/chat/completions", json={**body, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_the_unsure_sentence_is_withheld_and_the_others_delivered(client: TestClient) -> None:
    body = ask(client, "peru", logprobs=True)
    content = body["choices"][0]["message"]["content"]
    assert content == KEPT
    verdict = body["abstention"]
    assert verdict["decision"] == "partial"
    parts = verdict["sentences"]
    assert [p["decision"] for p in parts] == ["answer", "answer", "abstain"]
    assert [content[p["start"] : p["end"]] for p in parts] == [
        "Peru is in South America.",
        "Its capital is Lima.",
        "(not sure about this part)",
    ]
    assert parts[2]["confidence"] == pytest.approx(0.05)
    # The withheld text reaches the client nowhere: not in the body, not in logprobs.
    assert "peseta" not in json.dumps(body)


def test_completions_and_hedge(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "peru-hedge", "prompt": "Peru:"})
    assert r.status_code == 200
    text = r.json()["choices"][0]["text"]
    assert (
        text
        == "Peru is in South America. Its capital is Lima. (not sure) Its currency is the peseta."
    )
    assert r.json()["abstention"]["decision"] == "hedge"


def test_each_of_n_choices_is_judged_sentence_by_sentence(client: TestClient) -> None:
    body = ask(client, "peru", n=2)
    first, second = body["choices"]
    assert first["message"]["content"] == KEPT and first["abstention"]["decision"] == "partial"
    assert second["message"]["content"] == TEXT and second["abstention"]["decision"] == "answer"


def test_answer_granularity_judges_the_whole_answer(client: TestClient) -> None:
    body = ask(client, "peru-whole", logprobs=True)
    assert body["choices"][0]["message"]["content"] == "I don't know."
    assert "sentences" not in body["abstention"]
    # Asked for or not, the logprobs of an abstained answer would spell it out.
    assert body["choices"][0]["logprobs"] is None


def test_buffered_stream_carries_the_rewritten_answer(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "peru", "stream": True, "messages": [{"role": "user", "content": "Peru?"}]},
    )
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    text = "".join(
        c["delta"].get("content") or "" for e in events for c in e["choices"] if "delta" in c
    )
    assert text == KEPT
    assert events[-1]["abstention"]["decision"] == "partial"


def test_sentences_are_counted(client: TestClient) -> None:
    ask(client, "peru", n=2)
    metrics = client.get("/metrics").text
    line = 'abstain_sentences_total{decision="%s",model="peru",tenant="public"}'
    assert f"{line % 'answer'} 5.0" in metrics
    assert f"{line % 'abstain'} 1.0" in metrics
    assert 'abstain_choices_total{calibrated="false",decision="partial",model="peru"' in metrics
