"""The metrics the proxy exports, read back from /metrics after real requests."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tests.conftest import KEYS, auth

CHAT = {"messages": [{"role": "user", "content": "q"}]}


def samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(client: TestClient, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples(client).items() if n == name and want <= ls)


def test_requests_and_decisions_are_counted_per_tenant_and_model(client: TestClient) -> None:
    for model in ("sure", "sure", "unsure"):
        client.post("/v1/chat/completions", json={"model": model, **CHAT}, headers=auth("clinic"))
    assert value(client, "abstain_requests_total", tenant="clinic", model="sure",
                 decision="answer", status="200", route="chat") == 2  # fmt: skip
    assert value(client, "abstain_choices_total", tenant="clinic", model="unsure",
                 decision="abstain", calibrated="false") == 1  # fmt: skip
    assert value(client, "abstain_confidence_count", tenant="clinic") == 3


def test_expected_errors_sum_one_minus_confidence_over_delivered_answers(
    client: TestClient,
) -> None:
    bodies = [
        client.post("/v1/chat/completions", json={"model": m, **CHAT}, headers=auth("chat")).json()
        for m in ("sure", "unsure")  # chat tenant hedges: both are delivered
    ]
    expected = sum(1 - b["abstention"]["confidence"] for b in bodies)
    got = value(client, "abstain_expected_errors_total", tenant="chat")
    assert got == pytest.approx(expected, rel=1e-4)
    assert value(client, "abstain_expected_errors_avoided_total", tenant="chat") == 0


def test_abstentions_count_as_errors_avoided(client: TestClient) -> None:
    body = client.post(
        "/v1/chat/completions", json={"model": "unsure", **CHAT}, headers=auth("clinic")
    ).json()
    avoided = value(client, "abstain_expected_errors_avoided_total", tenant="clinic")
    assert avoided == pytest.approx(1 - body["abstention"]["confidence"], rel=1e-4)
    assert value(client, "abstain_expected_errors_total", tenant="clinic") == 0


def test_errors_are_counted_with_bounded_labels(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"model": "error-500", **CHAT}, headers=auth())
    client.post("/v1/chat/completions", json={"model": "made-up-name", **CHAT}, headers=auth())
    client.post("/v1/chat/completions", json={"model": "sure", **CHAT},
                headers={"authorization": "Bearer leaked-key"})  # fmt: skip
    assert value(client, "abstain_upstream_errors_total", upstream="fake", kind="status_500") == 1
    assert value(client, "abstain_requests_total", status="502", model="error-500") == 1
    assert value(client, "abstain_requests_total", status="404", model="unknown") == 1
    assert value(client, "abstain_requests_total", status="401", tenant="unknown") == 1
    text = client.get("/metrics").text
    assert "made-up-name" not in text
    assert "leaked-key" not in text
    for key in KEYS.values():
        assert key not in text


def test_latency_overhead_and_ttfb_histograms(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"model": "sure", **CHAT}, headers=auth())
    client.post(
        "/v1/chat/completions",
        json={"model": "sure", **CHAT, "stream": True},
        headers=auth("tool"),
    )
    assert value(client, "abstain_upstream_latency_seconds_count", upstream="fake") == 2
    assert value(client, "abstain_overhead_seconds_count", route="chat") == 2
    assert value(client, "abstain_time_to_first_byte_seconds_count", mode="passthrough") == 1
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    buckets = {
        s.labels["le"] for s in families["abstain_overhead_seconds"].samples if "le" in s.labels
    }
    assert {"0.001", "120.0"} <= buckets
