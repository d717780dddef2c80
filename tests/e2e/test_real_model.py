"""The proxy in front of the real reference model (Gemma 3 270M via llama.cpp's llama-server).

The model server and the proxy run as real processes; the client is the openai SDK.
Greedy decoding makes the model's answers repeatable; logprobs move by a few hundredths
of a nat with what the server batches together, so bounds have margin.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy import local_model
from proxy.confidence.logprobs import token_logprobs
from proxy.evaluation.prompts import get_template
from tests.e2e.procs import proxy

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

FEW_SHOT = (
    "Q: What is the capital of Italy?\nA: Rome\n"
    "Q: What is the chemical symbol of gold?\nA: Au\n"
    "Q: Who wrote Hamlet?\nA: William Shakespeare\n"
)


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with local_model.serving() as url:
        yield url


@pytest.fixture(scope="module")
def client(model_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    policy = tmp_path_factory.mktemp("real") / "policy.yaml"
    policy.write_text(
        f"""
upstreams:
  local: {{base_url: "{model_url}", supports_n: false}}
models:
  {local_model.MODEL_ALIAS}: {{upstream: local}}
  # Judged by agreement among 4 extra samples; a low temperature keeps this test stable.
  by-agreement: {{upstream: local, upstream_model: {local_model.MODEL_ALIAS}, method: consistency,
                 samples: 4, sample_temperature: 0.3, adaptive: false, sample_max_tokens: 16}}
defaults: {{threshold: 0.5, action: abstain, score: min_logprob}}
auth: {{unknown_keys: default, default_tenant: demo}}
tenants: {{demo: {{}}}}
"""
    )
    with proxy(Path(policy)) as (url, _proc):
        yield openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0, timeout=120)


def ask(
    client: openai.OpenAI, question: str, model: str = local_model.MODEL_ALIAS
) -> tuple[str, dict]:
    r = client.completions.create(
        model=model,
        prompt=f"{FEW_SHOT}Q: {question}\nA:",
        max_tokens=16,
        stop=["\n"],
        temperature=0,
    )
    return r.choices[0].text, r.model_extra["abstention"]


def test_a_question_the_model_knows_is_answered(client: openai.OpenAI) -> None:
    text, verdict = ask(client, "What is the capital of France?")
    assert "Paris" in text
    assert verdict["decision"] == "answer"
    assert verdict["confidence"] > 0.5


def test_a_question_it_cannot_know_gets_low_confidence_and_an_abstention(
    client: openai.OpenAI,
) -> None:
    text, verdict = ask(client, "Who discovered the element hafnium?")
    assert verdict["confidence"] < 0.3
    assert verdict["decision"] == "abstain"
    assert text == "I don't know."


def test_streaming_against_the_real_model(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=local_model.MODEL_ALIAS,
        prompt=f"{FEW_SHOT}Q: What is the capital of France?\nA:",
        max_tokens=8,
        stop=["\n"],
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].model_extra["abstention"]["decision"] == "answer"


def test_consistency_against_the_real_model(client: openai.OpenAI) -> None:
    text, verdict = ask(client, "What is the capital of France?", model="by-agreement")
    assert "Paris" in text
    assert verdict["method"] == "consistency"
    assert verdict["samples"] == 4
    # At temperature 0.3 the model says Paris nearly every time (p > 0.99 per sample).
    assert verdict["confidence"] >= 0.75
    assert verdict["decision"] == "answer"


# ------------------------------------------------- llama-server's own answers, direct


def post(model_url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(
        f"{model_url}{path}", json={"model": local_model.MODEL_ALIAS, **body}, timeout=120
    )
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def test_completions_carry_top_k_logprobs_in_a_shape_the_proxy_reads(model_url: str) -> None:
    prompt = get_template("qa-fewshot").prompt("What is the capital of France?")
    r = post(model_url, "/completions", {"prompt": prompt, "max_tokens": 8, "stop": ["\n"],
                                         "temperature": 0, "logprobs": 5})  # fmt: skip
    choice = r["choices"][0]
    assert "Paris" in choice["text"]
    # llama-server's completions use the chat shape: {"content": [{token, logprob, top_logprobs}]}.
    entries = choice["logprobs"]["content"]
    assert entries and all(len(e["top_logprobs"]) == 5 for e in entries)
    lps, tops = token_logprobs(choice["logprobs"])
    assert len(lps) == len(tops) == len(entries)
    assert all(-30 < lp <= 0 for lp in lps)
    # Greedy: the chosen token is the most likely one.
    assert all(lp == max(top) for lp, top in zip(lps, tops, strict=True))


def test_chat_logprobs_and_a_one_line_answer_from_the_base_model(model_url: str) -> None:
    r = post(model_url, "/chat/completions", {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 3,
    })  # fmt: skip
    choice = r["choices"][0]
    content = choice["message"]["content"]
    # The chat template frames the question for a base model; the server's default stop
    # ends the answer at the end of its line.
    assert "Paris" in content and "\n" not in content
    assert choice["finish_reason"] == "stop"
    lps, tops = token_logprobs(choice["logprobs"])
    assert lps and all(len(t) == 3 for t in tops)


def test_streamed_completions_carry_logprobs_per_token(model_url: str) -> None:
    prompt = get_template("qa-fewshot").prompt("What is the capital of France?")
    body = {"model": local_model.MODEL_ALIAS, "prompt": prompt, "max_tokens": 8, "stop": ["\n"],
            "temperature": 0, "logprobs": 5, "stream": True}  # fmt: skip
    texts, entries = [], []
    with httpx.stream("POST", f"{model_url}/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    texts.append(choice.get("text") or "")
                    if choice.get("logprobs"):
                        token_logprobs(choice["logprobs"])  # well-formed, or this raises
                        entries += choice["logprobs"]["content"]
    assert "Paris" in "".join(texts)
    assert entries and all(len(e["top_logprobs"]) == 5 for e in entries)


def test_the_server_decodes_concurrent_requests_in_parallel(model_url: str) -> None:
    # Three streams at once: with parallel slots each one's first token arrives before
    # any of them has finished; a server taking one request at a time cannot do that.
    body = {"model": local_model.MODEL_ALIAS, "prompt": "The history of Rome", "max_tokens": 24,
            "temperature": 0, "stop": ["<never>"], "stream": True}  # fmt: skip
    first: list[float] = []
    done: list[float] = []

    def one() -> None:
        with httpx.stream("POST", f"{model_url}/completions", json=body, timeout=120) as r:
            seen = False
            for line in r.iter_lines():
                if not seen and line.startswith("data: {"):
                    first.append(time.monotonic())
                    seen = True
        done.append(time.monotonic())

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(first) == len(done) == 3
    assert max(first) < min(done)


# --------------------------------------------------------- through the proxy, judged


def test_a_chat_question_is_answered_and_judged_like_the_same_completion(
    client: openai.OpenAI,
) -> None:
    question = "What is the capital of France?"
    chat = client.chat.completions.create(
        model=local_model.MODEL_ALIAS,
        messages=[{"role": "user", "content": question}],
        max_tokens=16,
        temperature=0,
    )
    content = chat.choices[0].message.content or ""
    verdict = chat.model_extra["abstention"]
    assert "Paris" in content and "\n" not in content
    assert verdict["decision"] == "answer" and verdict["confidence"] > 0.5
    # The chat frame is the qa-fewshot prompt: the same answer, the same score.
    completion = client.completions.create(
        model=local_model.MODEL_ALIAS,
        prompt=get_template("qa-fewshot").prompt(question),
        max_tokens=16, stop=["\n"], temperature=0,
    )  # fmt: skip
    assert completion.choices[0].text.strip() == content.strip()
    assert verdict["score"] == pytest.approx(
        completion.model_extra["abstention"]["score"], abs=0.15
    )


def test_a_chat_question_it_cannot_know_is_abstained(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=local_model.MODEL_ALIAS,
        messages=[{"role": "user", "content": "Who discovered the element hafnium?"}],
        max_tokens=16,
        temperature=0,
    )
    assert chat.model_extra["abstention"]["decision"] == "abstain"
    assert chat.choices[0].message.content == "I don't know."


def test_streaming_chat_against_the_real_model(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=local_model.MODEL_ALIAS,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].model_extra["abstention"]["decision"] == "answer"


def test_n_3_choices_are_drawn_concurrently_and_each_judged(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=local_model.MODEL_ALIAS,
        prompt=f"{FEW_SHOT}Q: What is the capital of France?\nA:",
        max_tokens=16, stop=["\n"], temperature=0.7, n=3, logprobs=2,
    )  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for choice in r.choices:
        assert choice.text
        assert choice.model_extra["abstention"]["decision"] in ("answer", "abstain")
        if choice.model_extra["abstention"]["decision"] == "answer":
            # The client asked for logprobs: they are passed on, well-formed.
            lps, _ = token_logprobs(choice.logprobs.model_dump())  # type: ignore[union-attr]
            assert lps
