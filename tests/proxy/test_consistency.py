"""Methods consistency and hybrid through the proxy: samples agree or split on command."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from proxy.call import Call
from proxy.decision_log import DecisionLog
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
from proxy.policy.loading import parse_policy
from proxy.recording import Recorder
from tests.conftest import POLICY, auth
from tests.fakes import ANSWER, SAMPLE_TEMPERATURE, FakeUpstream, completion
from tests.proxy.test_metrics import value

CHAT = {"messages": [{"role": "user", "content": "Capital of France?"}]}


def chat(client: TestClient, model: str, tenant: str = "chat", **extra: Any) -> dict:
    r = client.post(
        "/v1/chat/completions", json={"model": model, **CHAT, **extra}, headers=auth(tenant)
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_agreeing_samples_give_full_confidence(client: TestClient, fake: FakeUpstream) -> None:
    body = chat(client, "agree")
    verdict = body["abstention"]
    assert verdict["method"] == "consistency"
    assert verdict["score_name"] == "agreement"
    assert verdict["confidence"] == 1.0
    assert verdict["samples"] == 4
    assert verdict["decision"] == "answer"
    assert body["choices"][0]["message"]["content"] == ANSWER
    main = [r for r in fake.requests if r.get("temperature") != SAMPLE_TEMPERATURE]
    assert len(main) == 1 and "logprobs" not in main[0]  # consistency needs no logprobs
    # The upstream honours n: one request per round of two samples.
    assert [r.get("n") for r in fake.samples()] == [2, 2]


def test_without_n_support_samples_are_concurrent_single_requests(
    client: TestClient, fake: FakeUpstream
) -> None:
    body = chat(client, "agree-no-n")
    assert body["abstention"]["samples"] == 4
    assert [r.get("n") for r in fake.samples()] == [None] * 4


def test_disagreeing_samples_lower_confidence_and_trigger_the_action(client: TestClient) -> None:
    body = chat(client, "split", tenant="clinic")
    verdict = body["abstention"]
    assert verdict["confidence"] == 0.0  # no sample says what the client was told
    assert verdict["decision"] == "abstain"
    assert body["choices"][0]["message"]["content"] == "Please ask a clinician."


def test_show_majority_replaces_the_answer_with_the_samples_majority(client: TestClient) -> None:
    body = chat(client, "split-majority")
    assert body["choices"][0]["message"]["content"] == "Lyon"
    assert body["abstention"]["confidence"] == pytest.approx(0.75)
    assert body["abstention"]["decision"] == "answer"


def test_adaptive_stopping_stops_early_on_unanimous_samples(client: TestClient) -> None:
    body = chat(client, "agree-adaptive")
    # Uniform prior, risk 0.05, rounds of 2: after 2 of 2 the chance that more than 4 of
    # 8 agree is 0.88, after 4 of 4 it is past 0.95.
    assert body["abstention"]["samples"] == 4
    # The verdict reads the expected share of the full budget: (4 + 4 * 5/6) / 8.
    assert body["abstention"]["confidence"] == pytest.approx((4 + 4 * 5 / 6) / 8, abs=1e-6)
    assert value(client, "abstain_sampling_early_stops_total", model="agree-adaptive") == 1
    assert value(client, "abstain_samples_used_sum", model="agree-adaptive") == 4


def test_sampling_cost_is_counted(client: TestClient) -> None:
    chat(client, "agree-no-n")
    assert value(client, "abstain_sampling_upstream_requests_total", model="agree-no-n") == 4
    assert value(client, "abstain_sampling_tokens_total", model="agree-no-n") == 16
    assert value(client, "abstain_samples_used_count", model="agree-no-n") == 1


def test_failed_samples_fall_back_and_are_counted(client: TestClient) -> None:
    body = chat(client, "fail-samples", tenant="clinic")
    verdict = body["abstention"]
    assert verdict["decision"] == "abstain"  # no logprobs to fall back on: the action
    assert "on_sampling_error=fallback" in verdict["reason"]
    assert value(client, "abstain_sampling_fallbacks_total", fallback="fallback") == 1


def test_failed_samples_can_fail_the_request(make_client, policy_path) -> None:
    before = "fail-samples: {upstream: fake, method: consistency, samples: 4}"
    assert before in POLICY
    policy_path.write_text(POLICY.replace(before, before[:-1] + ", on_sampling_error: error}"))
    client = make_client()
    r = client.post("/v1/chat/completions", json={"model": "fail-samples", **CHAT}, headers=auth())
    assert r.status_code == 502


def test_hybrid_combines_logprobs_and_agreement(client: TestClient, fake: FakeUpstream) -> None:
    body = chat(client, "hybrid")
    verdict = body["abstention"]
    assert verdict["method"] == "hybrid"
    main = [r for r in fake.requests if r.get("temperature") != SAMPLE_TEMPERATURE]
    assert main[0]["logprobs"] is True
    assert all("logprobs" not in r for r in fake.samples())
    # Uncalibrated hybrid: the mean of exp(min_logprob) and the agreement.
    assert verdict["confidence"] == pytest.approx((math.exp(-0.01) + 1.0) / 2, abs=1e-6)
    assert body["choices"][0]["logprobs"] is None


def test_passthrough_stream_gets_its_verdict_from_samples(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "split", **CHAT, "stream": True},
        headers=auth("tool"),
    )
    finals = [line for line in r.text.split("\n\n") if '"abstention"' in line]
    assert '"samples":4' in finals[-1]
    assert '"decision":"annotate"' in finals[-1]


def test_buffered_stream_with_consistency_can_abstain(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "split", **CHAT, "stream": True},
        headers=auth("clinic"),
    )
    assert "Please ask a clinician." in r.text
    assert r.headers["x-abstention-decision"] == "abstain"


class SlowSamples:
    """An Upstream whose main answer is quick and whose samples hang until cancelled."""

    name = "slow-samples"
    supports_n = False

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def complete(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("temperature") != SAMPLE_TEMPERATURE:
            await asyncio.sleep(10)  # the main answer is slow too: the client leaves first
            return completion(kind, body)
        self.started += 1
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return completion(kind, body)

    def stream(self, kind: str, body: dict[str, Any]):  # pragma: no cover - unused
        raise NotImplementedError


async def test_a_client_that_goes_away_cancels_every_sample() -> None:
    policy = parse_policy(POLICY)
    upstream = SlowSamples()

    class Pool:
        def get(self, name: str) -> SlowSamples:
            return upstream

    recorder = Recorder(Metrics(CollectorRegistry()), DecisionLog(None))
    pipeline = Pipeline(Pool(), recorder)  # type: ignore[arg-type]
    rule = policy.rule("chat", "agree-no-n")
    call = Call("chat", {"model": "agree-no-n", **CHAT}, "chat", policy.route("agree-no-n"), rule)
    task = asyncio.create_task(pipeline.complete(call))
    while upstream.started < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert upstream.cancelled == upstream.started
