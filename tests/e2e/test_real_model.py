"""The proxy in front of the real reference model (Gemma 3 270M via llama-cpp-python).

The model server and the proxy run as real processes; the client is the openai SDK.
Greedy decoding makes the model's answers and logprobs repeatable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from proxy import local_model
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
