"""Through the proxy: a calibration reading the answer-text inputs (issue 12.4) gets them
computed from the request's question and the answer's tokens, for chat and completions,
complete and streamed; a calibration that does not read them never gets them."""

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
from proxy.confidence.calibration import Calibration, Logistic, Platt
from proxy.settings import Settings
from tests.conftest import KEYS, auth, sha
from tests.proxy.test_streaming import events

TOKELAU = "What is the capital of Tokelau?"
#: The answer copies the question: overlap 1, nothing new (its least likely token read).
COPY = ([" Tok", "el", "au"], [-0.2, -0.05, -0.05])
#: A year: the leading space (less likely than any digit) is skipped; the digit "4" read.
YEAR = ([" ", "1", "9", "4", "5"], [-1.5, -0.1, -0.05, -0.7, -0.3])
WAR = "In which year did the war end?"

FEATURES = ("question_overlap", "answer_min_logprob")
WEIGHTS, BIAS = (-3.0, 2.0), 0.5

POLICY = f"""
upstreams:
  fake: {{base_url: http://upstream.test/v1}}
models:
  text: {{upstream: fake, calibration: text.json}}
  text-stream: {{upstream: fake, upstream_model: text, calibration: text.json,
                streaming: passthrough}}
  plain: {{upstream: fake, calibration: plain.json}}
defaults:
  threshold: 0.5
  score: min_logprob
tenants:
  chat:
    api_key_sha256: ["{sha(KEYS["chat"])}"]
"""


def expected(overlap: float, least: float) -> float:
    z = BIAS + WEIGHTS[0] * overlap + WEIGHTS[1] * least
    return 1.0 / (1.0 + math.exp(-z))


class Upstream:
    """Answers with ``self.tokens`` (texts, logprobs) in the shape of the endpoint asked."""

    def __init__(self) -> None:
        self.tokens = COPY

    def _logprobs(self, kind: str, texts: list[str], lps: list[float]) -> dict[str, Any]:
        if kind == "chat":
            return {
                "content": [
                    {"token": t, "logprob": lp, "top_logprobs": [{"token": t, "logprob": lp}]}
                    for t, lp in zip(texts, lps, strict=True)
                ]
            }
        return {
            "tokens": texts,
            "token_logprobs": lps,
            "top_logprobs": [{t: lp} for t, lp in zip(texts, lps, strict=True)],
        }

    def _choice(self, kind: str, texts: list[str], lps: list[float], *, delta: bool) -> Any:
        text = "".join(texts)
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(kind, texts, lps)}
        if kind == "completions":
            choice["text"] = text
        else:
            choice["delta" if delta else "message"] = {"role": "assistant", "content": text}
        return choice

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        kind = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        texts, lps = self.tokens
        head = {"id": "cmpl-1", "object": "x", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            choice = {**self._choice(kind, texts, lps, delta=False), "finish_reason": "stop"}
            return httpx.Response(200, json={**head, "choices": [choice]})
        chunks = []
        for t, lp in zip(texts, lps, strict=True):  # one token per chunk
            chunks.append({**head, "choices": [self._choice(kind, [t], [lp], delta=True)]})
        end = {"index": 0, "finish_reason": "stop", "logprobs": None}
        end.update({"text": ""} if kind == "completions" else {"delta": {}})
        chunks.append({**head, "choices": [end]})
        payload = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
        return httpx.Response(
            200,
            content=payload + b"data: [DONE]\n\n",
            headers={"content-type": "text/event-stream"},
        )


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "decisions.jsonl"


@pytest.fixture
def client(tmp_path: Path, upstream: Upstream, log: Path) -> Iterator[TestClient]:
    Calibration(score=FEATURES[0], calibrator=Logistic(FEATURES, WEIGHTS, BIAS), model="text").save(
        tmp_path / "text.json"
    )
    Calibration(score="min_logprob", calibrator=Platt("min_logprob", 2.0, 2.0), model="plain").save(
        tmp_path / "plain.json"
    )
    (tmp_path / "policy.yaml").write_text(POLICY)
    settings = Settings(
        policy=tmp_path / "policy.yaml",
        handle_signals=False,
        reload_interval_seconds=0,
        decision_log=log,
    )
    app = create_app(
        settings, transport=httpx.MockTransport(upstream), registry=CollectorRegistry()
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def chat(question: str) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": question}]}  # fmt: skip


def completions(question: str) -> dict[str, Any]:
    return {"prompt": f"Q: Who wrote Hamlet?\nA: Shakespeare\nQ: {question}\nA:"}


def ask(client: TestClient, model: str, kind: str, question: str, **extra: Any) -> Any:
    route = "chat/completions" if kind == "chat" else "completions"
    body = chat(question) if kind == "chat" else completions(question)
    r = client.post(f"/v1/{route}", json={"model": model, **body, **extra}, headers=auth("chat"))
    assert r.status_code == 200, r.text
    if extra.get("stream"):
        return events(r.text)[-2]["abstention"]
    return r.json()["abstention"]


def logged_scores(log: Path) -> list[dict[str, float]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [d["scores"] for d in lines if d.get("type") == "decision"]


CASES = [
    pytest.param(COPY, TOKELAU, (1.0, -0.2), id="copied"),
    pytest.param(YEAR, WAR, (0.0, -0.7), id="number"),
]


@pytest.mark.parametrize("kind", ["chat", "completions"])
@pytest.mark.parametrize(("tokens", "question", "inputs"), CASES)
@pytest.mark.parametrize(
    ("model", "extra"),
    [("text", {}), ("text", {"stream": True}), ("text-stream", {"stream": True})],
    ids=["complete", "buffered-stream", "passthrough-stream"],
)
def test_the_live_path_computes_the_text_scores(
    client: TestClient,
    upstream: Upstream,
    log: Path,
    kind: str,
    tokens: tuple[list[str], list[float]],
    question: str,
    inputs: tuple[float, float],
    model: str,
    extra: dict[str, Any],
) -> None:
    upstream.tokens = tokens
    verdict = ask(client, model, kind, question, **extra)
    assert verdict["calibrated"] is True
    assert verdict["confidence"] == pytest.approx(expected(*inputs), abs=1e-6)
    (scores,) = logged_scores(log)
    assert {n: scores[n] for n in FEATURES} == pytest.approx(
        dict(zip(FEATURES, inputs, strict=True))
    )


def test_a_copied_answer_is_withheld_and_a_new_one_answered(
    client: TestClient, upstream: Upstream
) -> None:
    upstream.tokens = ([" Fak", "aofo"], [-0.05, -0.02])  # P = 0.60
    assert ask(client, "text", "chat", TOKELAU)["decision"] == "answer"
    upstream.tokens = COPY
    assert ask(client, "text", "chat", TOKELAU)["decision"] == "abstain"


def test_without_a_question_the_inputs_that_read_it_are_missing(
    client: TestClient, upstream: Upstream, log: Path
) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "text", "messages": [{"role": "system", "content": "Say a city."}]},
        headers=auth("chat"),
    )
    verdict = r.json()["abstention"]
    assert verdict["confidence"] is None  # judged by on_missing_score, not guessed
    assert verdict["decision"] == "abstain"
    (scores,) = logged_scores(log)
    assert "min_logprob" in scores and not set(FEATURES) & set(scores)


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_calibration_without_text_inputs_never_reads_them(
    client: TestClient, log: Path, kind: str
) -> None:
    ask(client, "plain", kind, TOKELAU)
    ask(client, "plain", kind, TOKELAU, stream=True)
    for scores in logged_scores(log):
        assert "min_logprob" in scores
        assert not set(FEATURES) & set(scores)
